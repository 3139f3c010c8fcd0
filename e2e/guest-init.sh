#!/bin/sh
# PID 1 of the end-to-end guest (no initramfs, no systemd).  The root is the
# host's / over virtio-fs, read-only; the kernel passes vf_repo, vf_run and
# vf_step_timeout from its command line as environment variables.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/e2e/share /run/e2e/ctl /run/e2e/mnt
mount -t virtiofs share /run/e2e/share &&
mount -t virtiofs ctl /run/e2e/ctl &&
"$vf_repo/.venv/bin/python" "$vf_repo/e2e/guest.py" --run "$vf_run" --step-timeout "${vf_step_timeout:-120}"
echo "e2e-guest: guest.py exited with $?"
umount /run/e2e/ctl /run/e2e/share 2>/dev/null
sync
echo o > /proc/sysrq-trigger    # power off: QEMU exits (-no-reboot)
sleep 60
