#!/usr/bin/env bash
# The confidential-container flow, simulated on one machine.
#
#   host  (untrusted): prepares SHARE = data + store + signed manifest, and can
#                      rewrite any of it at any time;
#   guest (trusted):   knows only the signing key's public half and the
#                      manifest digest (both would come with its attested
#                      image); mounts SHARE with verityfuse *inside the guest*.
#
# Here the "share" is a directory, the attacker is a process running as
# another user with write access to it, and each attack is shown refused.
# Needs root (mounting, drop_caches, switching to the attacker's uid).
set -euo pipefail

work=$(mktemp -d /tmp/verityfuse-cc.XXXXXX)
share=$work/share guest=$work/guest-mnt secrets=$work/signing-key
mkdir -p "$share" "$guest" "$secrets"
chmod 755 "$work"
cleanup() {
    mountpoint -q "$guest" && verityfuse umount "$guest"
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Invert the byte at OFFSET of FILE: random data, or a hash of it, may hold any fixed byte already.
flip_byte() {
    local old
    old=$(od -An -tu1 -j "$2" -N1 "$1")
    printf "$(printf '\\%03o' $((old ^ 255)))" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
attacker() { setpriv --reuid=65534 --regid=65534 --clear-groups -- "$@"; }  # nobody
expect_refused() {  # expect_refused ERRNO-TEXT FILE
    if out=$(cat "$2" 2>&1 >/dev/null); then
        echo "UNEXPECTED: $2 was readable"; exit 1
    fi
    case "$out" in *"$1"*) echo "refused as expected: $out";; *) echo "UNEXPECTED: $out"; exit 1;; esac
}

step "Host (build pipeline): sign the share"
verityfuse keygen "$secrets/key.pem" "$secrets/pub.pem"
printf 'db_url = postgres://trusted\n' > "$share/config"
head -c 200000 /dev/urandom > "$share/app.bin"
mkdir "$share/lib" && head -c 50000 /dev/urandom > "$share/lib/libx.so"
verityfuse seal "$share" --manifest "$share/manifest.json" --sign-key "$secrets/key.pem" >/dev/null
pinned=$(verityfuse measure-manifest "$share/manifest.json")
echo "manifest digest to attest/pin: $pinned"
cp "$secrets/pub.pem" "$work/guest-trusted-pub.pem"   # ships inside the guest image
# From here on the host is hostile: it can write the whole share.
chown -R 65534:65534 "$share"

mount_guest() {
    verityfuse mount "$share" "$guest" --policy require --manifest "$share/manifest.json" \
        --trust-key "$work/guest-trusted-pub.pem" --manifest-digest "$pinned" \
        --log-file "$work/guest.log"
}

step "Guest: mount with the pinned key and digest; reads are verified"
mount_guest
cat "$guest/config"
cmp "$share/app.bin" "$guest/app.bin" && echo "app.bin verified"

step "Attack 1: flip a byte of lib/libx.so's stored Merkle tree"
d=$(fsverity digest --compact "$share/lib/libx.so")
attacker bash -c "$(declare -f flip_byte); flip_byte '$share/.verityfuse/objects/sha256/${d:0:2}/$d' 400"
echo 3 > /proc/sys/vm/drop_caches
expect_refused "Input/output error" "$guest/lib/libx.so"
cmp "$share/app.bin" "$guest/app.bin" && echo "app.bin still verified"

step "Attack 2: change config and re-seal it (data and tree agree)"
attacker sh -c "printf 'db_url = postgres://evil\n' > '$share/config'"
attacker verityfuse seal "$share" "$share/config" >/dev/null
echo 3 > /proc/sys/vm/drop_caches
expect_refused "Input/output error" "$guest/config"

step "Attack 3: swap two sealed files"
attacker sh -c "mv '$share/app.bin' '$share/t' && mv '$share/lib/libx.so' '$share/app.bin' && mv '$share/t' '$share/lib/libx.so'"
echo 3 > /proc/sys/vm/drop_caches
expect_refused "Input/output error" "$guest/app.bin"

step "Attack 4: point lib/libx.so at a file outside the share with a symlink"
attacker sh -c "rm -f '$share/lib/libx.so' && ln -s /etc/passwd '$share/lib/libx.so'"
echo 3 > /proc/sys/vm/drop_caches
expect_refused "Input/output error" "$guest/lib/libx.so"

step "Attack 5: add a file, and change a file's mode"
attacker sh -c "echo 'payload' > '$share/backdoor.sh' && chmod 4777 '$share/config'"
expect_refused "No such file or directory" "$guest/backdoor.sh"
ls "$guest"
echo "config: mode $(stat -c %a "$guest/config") in the guest, $(stat -c %a "$share/config") on the share"
verityfuse umount "$guest"

step "Attack 6: replace the manifest with one signed by the host's own key"
verityfuse keygen "$work/host.pem" "$work/host.pub" >/dev/null
verityfuse seal "$share" --manifest "$work/host-manifest.json" --sign-key "$work/host.pem" 2>/dev/null >/dev/null
attacker cp "$work/host-manifest.json" "$share/manifest.json"
if mount_guest 2>"$work/err"; then echo "UNEXPECTED: mounted"; exit 1; fi
echo "mount refused: $(cat "$work/err")"

step "What the guest logged"
grep -E "WARNING" "$work/guest.log" | sed 's/^[^]]*\] //' | head -8
echo
echo "Every attack was refused. The host can still deny service (delete files, fail"
echo "reads); it cannot make the guest see a name, a mode, an owner, a link target or a"
echo "byte that the pinned manifest does not vouch for."
