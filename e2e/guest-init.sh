#!/bin/sh
# PID 1 of the end-to-end guest (no initramfs, no systemd).  The root is the
# host's / over virtio-fs, read-only; the kernel passes vf_repo (this checkout),
# vf_python (the host's interpreter), vf_run and vf_step_timeout from its command
# line as environment variables (quoted there, so paths may hold spaces).
# Only /proc, /sys, /dev and /run are covered by the guest's own filesystems
# (e2e/run.py refuses checkouts under them); /tmp stays the host's, so a checkout
# under /tmp is visible, and the writable scratch space is /run.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/run/home TMPDIR=/run/tmp PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$vf_repo${PYTHONPATH:+:$PYTHONPATH}"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/e2e/share /run/e2e/ctl /run/e2e/mnt /run/e2e/tpm "$HOME" "$TMPDIR"
chmod 1777 "$TMPDIR"
if mount -t virtiofs share /run/e2e/share && mount -t virtiofs ctl /run/e2e/ctl; then
    if [ -x "$vf_python" ] && [ -f "$vf_repo/e2e/guest.py" ]; then
        "$vf_python" "$vf_repo/e2e/guest.py" --run "$vf_run" --step-timeout "${vf_step_timeout:-120}"
        echo "e2e-guest: guest.py exited with $?"
    else
        # The host stops waiting when it sees this file, and prints it.
        echo "the guest cannot run '$vf_python' '$vf_repo/e2e/guest.py' (not visible through the" \
             "guest's root, the host's / over virtio-fs)" > /run/e2e/ctl/init-error
        cat /run/e2e/ctl/init-error
    fi
fi
umount /run/e2e/ctl /run/e2e/share 2>/dev/null
sync
echo o > /proc/sysrq-trigger    # power off: QEMU exits (-no-reboot)
sleep 60
