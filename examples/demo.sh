#!/usr/bin/env bash
# The verityfuse demo: seal a directory, mount a verified view of it, read it,
# tamper with one block behind the daemon's back and watch exactly that block
# fail with EIO, then unmount.  Needs root (drop_caches) and /dev/fuse.
set -euo pipefail

work=$(mktemp -d /tmp/verityfuse-demo.XXXXXX)
src=$work/src mnt=$work/mnt
mkdir -p "$src/docs" "$mnt"
cleanup() {
    mountpoint -q "$mnt" && verityfuse umount "$mnt"
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# Invert the byte at OFFSET of FILE: random data may hold any fixed byte already.
flip_byte() {
    local old
    old=$(od -An -tu1 -j "$2" -N1 "$1")
    printf "$(printf '\\%03o' $((old ^ 255)))" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

step "A source directory"
head -c $((1024 * 1024)) /dev/urandom > "$src/data.bin"     # 256 blocks of 4 KiB
printf 'hello, verified world\n' > "$src/docs/hello.txt"
: > "$src/empty"
ls -lR "$src"

step "Seal it: Merkle trees go to the sidecar store $src/.verityfuse"
verityfuse seal "$src"
echo "cross-check with fsverity-utils:"
fsverity digest "$src/data.bin" "$src/docs/hello.txt" "$src/empty"

step "Mount a verified view"
verityfuse mount "$src" "$mnt" --log-file "$work/daemon.log"
mount | grep " $mnt "
ls -la "$mnt"

step "Every read is verified"
cat "$mnt/docs/hello.txt"
cmp "$src/data.bin" "$mnt/data.bin" && echo "data.bin: identical through the mount"
getfattr -d -m - --absolute-names "$mnt/data.bin"

step "A verity file is read-only, as on ext4"
echo more >> "$mnt/docs/hello.txt" || echo "(append refused, as expected)"

step "Tamper with block 100 of data.bin behind the daemon's back"
cp "$src/data.bin" "$work/data.orig"
flip_byte "$src/data.bin" $((100 * 4096 + 7))
echo 3 > /proc/sys/vm/drop_caches
if cat "$mnt/data.bin" > /dev/null; then
    echo "UNEXPECTED: the tampered file read back"; exit 1
fi
echo "block 99 still reads:  $(dd if="$mnt/data.bin" bs=4096 skip=99 count=1 status=none | wc -c) bytes"
dd if="$mnt/data.bin" bs=4096 skip=100 count=1 of=/dev/null status=none \
    || echo "block 100 fails with EIO, as it must"
echo "block 101 still reads: $(dd if="$mnt/data.bin" bs=4096 skip=101 count=1 status=none | wc -c) bytes"
echo "the daemon's log:"
grep "integrity failure" "$work/daemon.log" | cut -c1-160

step "Offline check of the whole tree"
verityfuse verify "$src" || echo "(verify exits 1: data.bin is corrupt)"

step "Unmount"
verityfuse umount "$mnt"

step "Confidential-container mode: a signed manifest, a measured mount"
cp "$work/data.orig" "$src/data.bin"
verityfuse keygen "$work/key.pem" "$work/pub.pem"
verityfuse seal "$src" --manifest "$work/manifest.json" --sign-key "$work/key.pem" > /dev/null
pin=$(verityfuse measure-manifest "$work/manifest.json" 2>/dev/null)
echo "the manifest digest a verifier pins: $pin"
# The guest's mount: only the key and the pin are trusted.  Before it serves anything it
# extends a MountManifest event into a register (here an emulated one; --measure tpm in a
# real guest) and appends it to an event log a remote verifier replays.
verityfuse mount "$src" "$mnt" --manifest "$work/manifest.json" --trust-key "$work/pub.pem" \
    --manifest-digest "$pin" --measure "file:$work/register" --event-log "$work/events.log" \
    --log-file "$work/daemon.log"
cat "$mnt/docs/hello.txt"
echo "the host tampers with docs/hello.txt"
printf 'HELLO' | dd of="$src/docs/hello.txt" bs=1 conv=notrunc status=none
echo 3 > /proc/sys/vm/drop_caches
cat "$mnt/docs/hello.txt" 2>/dev/null || echo "docs/hello.txt fails with EIO, and the violation is measured"
echo "the event log:"
cut -c1-150 "$work/events.log"
echo "the verifier replays it against the register:"
verityfuse attest replay "$work/events.log" --register "$(cat "$work/register")" \
    --expect-manifest "$pin" || echo "(appraisal fails: the guest saw tampering)"
verityfuse umount "$mnt"
echo "unmounted: the daemon's last event says the manifest is no longer served there:"
tail -n 1 "$work/events.log" | cut -c1-150
echo "done"
