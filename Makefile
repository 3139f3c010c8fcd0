# Everything a fresh Debian machine needs, as root:  make demo  /  make test
PYTHON ?= python3
VENV   ?= .venv
APT_PACKAGES = fuse3 libfuse3-dev pkg-config fsverity attr e2fsprogs gcc libssl-dev
STAMP  = $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py verityfuse/_hashblocks.c verityfuse/_fuseshim.c
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

test: setup
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/python bench/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
