#!/usr/bin/env bash
# Fetch the guest kernel for `make e2e` into DIR (default build/e2e): the newest
# linux-image-6.12.*-cloud-amd64 that the linux-image-6.12-cloud-amd64 meta-package
# (bookworm-security) points to, downloaded with apt-get and unpacked into
# DIR/kernel -- not installed.  Checks that what the guest needs is built in.
set -euo pipefail
dir=${1:-build/e2e}
meta=${E2E_KERNEL_META:-linux-image-6.12-cloud-amd64}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -f "$dir/kernel/.unpacked" ]; then
    echo "guest kernel: $(cat "$dir/kernel/.unpacked") (already in $dir/kernel)"
    exit 0
fi
resolve() { apt-cache depends "$meta" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*\)$/\1/p' | head -n1; }
pkg=$(resolve)
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(resolve)
fi
if [ -z "$pkg" ]; then
    echo "ERROR: apt knows no $meta (is bookworm-security among the apt sources?)" >&2
    exit 1
fi
rm -rf "$dir/deb" "$dir/kernel"
mkdir -p "$dir/deb"
(cd "$dir/deb" && apt-get download -q -o APT::Sandbox::User=root "$pkg")
deb=$(ls "$dir"/deb/*.deb)
dpkg-deb -x "$deb" "$dir/kernel"
config=$(ls "$dir"/kernel/boot/config-*)
ls "$dir"/kernel/boot/vmlinuz-* >/dev/null
missing=""
for opt in VIRTIO_FS FUSE_FS FS_VERITY VIRTIO_PCI VIRTIO DEVTMPFS TMPFS SERIAL_8250_CONSOLE TCG_TPM TCG_TIS; do
    grep -qx "CONFIG_$opt=y" "$config" || missing="$missing CONFIG_$opt"
done
if [ -n "$missing" ]; then
    echo "ERROR: $pkg does not build in (=y):$missing; the guest has no initramfs" >&2
    exit 1
fi
echo "$pkg" > "$dir/kernel/.unpacked"
echo "guest kernel: $pkg, unpacked into $dir/kernel"
