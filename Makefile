# Everything a fresh Debian machine needs, as root:  make demo  /  make test  /  make e2e
PYTHON ?= python3
VENV   ?= .venv
# swtpm, tpm2-tools, libtss2-dev: measured mounts (a software TPM for the tests, tpm2-pytss's build);
# xfsprogs: xfs_io, the FSGETXATTR oracle of tests/test_ioctl.py
APT_PACKAGES = fuse3 libfuse3-dev pkg-config fsverity attr e2fsprogs gcc libssl-dev \
               swtpm swtpm-tools tpm2-tools libtss2-dev xfsprogs
STAMP  = $(VENV)/.installed

# make e2e: a Linux guest (QEMU, TCG) with a virtual TPM (swtpm, attached by QEMU; tpm2-tools in
# the guest, whose root is this machine's /) reads a virtio-fs share while the host tampers.
E2E_APT_PACKAGES = qemu-system-x86 swtpm swtpm-tools tpm2-tools
E2E_DIR ?= build/e2e

.PHONY: setup demo test bench clean e2e e2e-deps registry-deps

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard verityfuse/*.c)
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

demo: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH examples/demo.sh

test: setup registry-deps
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/bench.py $(BENCH_ARGS)

e2e: setup e2e-deps
	$(VENV)/bin/python e2e/run.py --build $(E2E_DIR) $(E2E_ARGS)

# QEMU and its virtiofsd (qemu-system-common), swtpm and tpm2-tools (also in APT_PACKAGES; listed
# here too because setup skips its apt step once its venv stamp exists), then the guest kernel,
# unpacked into $(E2E_DIR)/kernel (downloaded once, never installed).
e2e-deps: setup
	@missing=""; for p in $(E2E_APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	e2e/fetch-kernel.sh $(E2E_DIR)

clean:
	rm -rf $(VENV) build *.egg-info

# The OCI tests' registry: Debian's docker-registry unpacked into $(REGISTRY_DIR)/root
# (downloaded once, never installed: installing it starts a service on port 5000).
REGISTRY_DIR ?= build/registry
registry-deps:
	e2e/fetch-registry.sh $(REGISTRY_DIR)
