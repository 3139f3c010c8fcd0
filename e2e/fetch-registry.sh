#!/usr/bin/env bash
# Fetch Debian's docker-registry (the reference OCI distribution implementation, 2.8) for the
# OCI tests into DIR (default build/registry): downloaded with apt-get and unpacked into
# DIR/root -- never installed, because installing it starts a system service on port 5000.
# The tests start DIR/root/usr/bin/docker-registry themselves on 127.0.0.1 and stop it.
set -euo pipefail
dir=${1:-build/registry}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
bin="$dir/root/usr/bin/docker-registry"
if [ -x "$bin" ]; then
    echo "docker-registry: already in $dir/root"
    exit 0
fi
rm -rf "$dir/deb" "$dir/root"
mkdir -p "$dir/deb"
if ! (cd "$dir/deb" && apt-get download -q -o APT::Sandbox::User=root docker-registry); then
    apt-get update -qq
    (cd "$dir/deb" && apt-get download -q -o APT::Sandbox::User=root docker-registry)
fi
dpkg-deb -x "$dir"/deb/docker-registry_*.deb "$dir/root"
"$bin" --version
