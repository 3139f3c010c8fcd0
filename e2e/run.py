"""``make e2e``: a real Linux guest reads a real virtio-fs share while this host tampers.

The host (untrusted) builds and seals a share, serves it with virtiofsd, and
boots a guest (QEMU, TCG) whose root is this machine's / (read-only, over a
second virtiofsd) so that it runs this repository's venv.  Inside the guest,
e2e/guest.py mounts the share with verityfuse in manifest mode and runs the
checks of tests/manifest_attacks.py; for each attack it writes ``ready-<n>``
to a third, writable share ("ctl"), this script performs the attack's host
action on the share and answers ``done-<n>``, and the guest reports the check
by name.  Prints each check with PASS/FAIL; exits 1 on any FAIL, missing
result or timeout, after printing the guest console's tail and the daemon's log.

Nothing is left running: QEMU and the virtiofsd processes are in their own
process groups and are killed and waited for on every exit path.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import manifest_attacks as ma  # noqa: E402

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
GUEST_NAMES = ["mount"] + ma.CHECK_NAMES


class Timeout(Exception):
    pass


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_parent():
    """In the child: SIGKILL when this script dies, even by SIGKILL (no finally runs then)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Run:
    def __init__(self, args):
        self.args = args
        self.build = Path(args.build).resolve()
        self.dir = self.build / "run"
        self.share, self.ctl = self.dir / "share", self.dir / "ctl"
        self.console = self.dir / "console.log"
        self.procs = []          # (name, Popen), each the leader of its own process group
        self.qemu = None
        self.seen = 0            # bytes of ctl/results already printed
        self.host_errors = {}

    # -- processes --------------------------------------------------------------
    def spawn(self, name, cmd, log):
        with open(log, "wb") as out:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, preexec_fn=die_with_parent)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        for name, p in reversed(self.procs):   # QEMU first, then its virtiofsd
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait()

    def check_alive(self, what):
        for name, p in self.procs:
            if p.poll() is not None:
                raise Timeout(f"{name} exited with {p.returncode} while waiting for {what}")

    def wait_for(self, path: Path, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while not path.exists():
            self.print_results()
            self.check_alive(what)
            if time.monotonic() > deadline:
                raise Timeout(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.05)
        self.print_results()
        return path.read_text()

    # -- results ----------------------------------------------------------------
    def print_results(self):
        """Print result lines as the guest appends them."""
        try:
            with open(self.ctl / "results", "rb") as f:
                f.seek(self.seen)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1
        for line in data[:end].decode().splitlines():
            r = json.loads(line)
            print(f"  {'PASS' if r['ok'] else 'FAIL'}  {r['check']:32} {r['seconds']:6.1f}s  "
                  f"{r['detail'][:160]}", flush=True)
        self.seen += end

    def results(self):
        out = {}
        try:
            for line in (self.ctl / "results").read_text().splitlines():
                try:
                    r = json.loads(line)
                    out[r["check"]] = r
                except ValueError:
                    pass
        except FileNotFoundError:
            pass
        return out

    # -- the run ------------------------------------------------------------------
    def prepare(self):
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for d in (self.share, self.ctl, self.dir / "keys"):
            d.mkdir(parents=True)
        ma.make_corpus(self.share)
        trust = ma.seal_share(self.share, self.dir / "keys")
        # What the guest image would carry (attested): key and pinned manifest digest.
        (self.dir / "trust.json").write_text(json.dumps(trust))
        self.exp = ma.expected(self.share)
        (self.ctl / "expected.json").write_text(json.dumps(self.exp))

    def kernel(self) -> Path:
        found = sorted(glob.glob(str(self.build / "kernel" / "boot" / "vmlinuz-*")))
        if not found:
            raise SystemExit(f"no guest kernel in {self.build}/kernel/boot (make e2e fetches it)")
        return Path(found[-1])

    def start(self):
        a = self.args
        socks = {}
        for tag, source, cache in (("rootfs", "/", "auto"), ("share", self.share, "none"),
                                   ("ctl", self.ctl, "none")):
            socks[tag] = self.dir / f"{tag}.sock"
            self.spawn(f"virtiofsd[{tag}]",
                       [a.virtiofsd, f"--socket-path={socks[tag]}", "-o", f"source={source}",
                        "-o", f"cache={cache}", "-o", "sandbox=chroot"],
                       self.dir / f"virtiofsd-{tag}.log")
        deadline = time.monotonic() + 10
        while not all(s.exists() for s in socks.values()):
            self.check_alive("the virtiofsd sockets")
            if time.monotonic() > deadline:
                raise Timeout("virtiofsd sockets did not appear within 10 s")
            time.sleep(0.02)
        cmdline = (f"console=ttyS0 loglevel=4 root=rootfs rootfstype=virtiofs ro panic=-1 "
                   f"init={REPO}/e2e/guest-init.sh vf_repo={REPO} vf_run={self.dir} "
                   f"vf_step_timeout={a.step_timeout:.0f}")
        mem = a.memory
        cmd = [a.qemu, "-name", "verityfuse-e2e", "-nodefaults", "-no-user-config", "-no-reboot",
               "-accel", "tcg", "-cpu", "max", "-smp", str(a.smp), "-m", mem,
               "-object", f"memory-backend-memfd,id=mem,size={mem},share=on", "-numa", "node,memdev=mem",
               "-kernel", str(self.kernel()), "-append", cmdline,
               "-display", "none", "-serial", f"file:{self.console}"]
        for i, tag in enumerate(socks):
            cmd += ["-chardev", f"socket,id=vfs{i},path={socks[tag]}",
                    "-device", f"vhost-user-fs-pci,chardev=vfs{i},tag={tag}"]
        self.qemu = self.spawn("qemu", cmd, self.dir / "qemu.log")

    def attacks(self):
        for n, attack in enumerate(ma.ATTACKS):
            name = self.wait_for(self.ctl / f"ready-{n}", self.args.step_timeout,
                                 f"the guest to be ready for {attack.name}").strip()
            if name != attack.name:
                raise Timeout(f"the guest is ready for {name!r}, the host expected {attack.name!r}")
            try:
                attack.host(self.share, self.exp)
                done = "ok"
            except Exception as e:
                traceback.print_exc()
                done = f"error: {type(e).__name__}: {e}"
                self.host_errors[attack.name] = done
            tmp = self.ctl / f".done-{n}.tmp"
            tmp.write_text(done + "\n")
            os.rename(tmp, self.ctl / f"done-{n}")

    def main(self) -> int:
        t_start = time.monotonic()
        failure = None
        boot = None
        print(f"e2e: preparing and sealing the share in {self.dir}", flush=True)
        self.prepare()
        try:
            self.start()
            t_boot = time.monotonic()
            print(f"e2e: booting the guest (TCG; console: {self.console})", flush=True)
            self.wait_for(self.ctl / "booted", self.args.boot_timeout, "the guest to boot")
            boot = time.monotonic() - t_boot
            print(f"e2e: guest booted in {boot:.1f} s; checks (guest side):", flush=True)
            self.attacks()
            self.wait_for(self.ctl / "finished", self.args.step_timeout, "the guest to finish")
            try:
                self.qemu.wait(60)
            except subprocess.TimeoutExpired:
                raise Timeout("the guest did not power off within 60 s") from None
        except Timeout as e:
            failure = str(e)
        except KeyboardInterrupt as e:
            failure = f"interrupted ({e or 'SIGINT'})"
        finally:
            self.stop_all()
        self.print_results()
        return self.report(failure, boot, time.monotonic() - t_start)

    def report(self, failure, boot, total) -> int:
        res = self.results()
        print("\ne2e summary (each check ran in the guest on the virtio-fs share):")
        failed = []
        for name in GUEST_NAMES:
            r = res.get(name)
            if r is None:
                status, detail = "FAIL", "no result (missing)"
            else:
                status, detail = ("PASS" if r["ok"] else "FAIL"), r["detail"]
            if name in self.host_errors:
                status, detail = "FAIL", f"host action failed: {self.host_errors[name]}; {detail}"
            if status == "FAIL":
                failed.append(name)
            print(f"  {status}  {name:32} {detail[:200]}")
        if failure:
            print(f"\ne2e: {failure}")
        if failed or failure:
            tail(self.console, 60, "guest console")
            tail(self.ctl / "verityfuse.log", 80, "guest verityfuse log")
        if failure:
            for log in sorted(self.dir.glob("virtiofsd-*.log")) + [self.dir / "qemu.log"]:
                tail(log, 10, log.name)
        b = f"{boot:.1f} s" if boot is not None else "-"
        print(f"\ne2e: {len(GUEST_NAMES) - len(failed)}/{len(GUEST_NAMES)} checks passed; "
              f"boot {b}, total {total:.0f} s; files in {self.dir}")
        return 1 if failed or failure else 0


def tail(path: Path, n: int, what: str):
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        print(f"\n--- {what}: {path} does not exist")
        return
    print(f"\n--- {what} ({path}), last {min(n, len(lines))} of {len(lines)} lines:")
    for line in lines[-n:]:
        print("    " + line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=str(REPO / "build" / "e2e"),
                    help="build directory holding kernel/ (the unpacked guest kernel); run/ goes there")
    ap.add_argument("--boot-timeout", type=float, default=120)
    ap.add_argument("--step-timeout", type=float, default=120)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--virtiofsd", default=VIRTIOFSD)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--memory", default="2G")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("e2e: needs root (virtiofsd, drop_caches, chown)")

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    sys.exit(Run(args).main())


if __name__ == "__main__":
    main()
