"""``make e2e``: a real Linux guest reads a real virtio-fs share while this host tampers.

The host (untrusted) builds and seals a share, serves it with virtiofsd, and
boots a guest (QEMU, TCG) whose root is this machine's / (read-only, over a
second virtiofsd) so that it runs this interpreter on this checkout, with a
virtual TPM (swtpm).  Inside the guest, e2e/guest.py mounts the share with
verityfuse in manifest mode, measured into PCR 23, and runs the checks of
tests/manifest_attacks.py; for each attack it writes ``ready-<n>`` to a third,
writable share ("ctl"), this script performs the attack's host action on the
share and answers ``done-<n>``, and the guest reports the check by name.  Then
the guest quotes PCR 23 with this script's nonce, and this script, as the
remote verifier, replays the event log against the quote (e2e/verifier.py).
Last, the host puts back an older signed manifest, which the guest must refuse.
Prints each check with PASS/FAIL; exits 1 on any FAIL, missing result or
timeout, after printing the guest console's tail and the daemon's log.

Nothing is left running: QEMU, swtpm and the virtiofsd processes are in their
own process groups and are killed and waited for on every exit path.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import plan
import report
import verifier
from paths import qemu_escape, validate_paths
from plan import ma
from report import read_results

REPO = Path(__file__).resolve().parent.parent
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
# The manifest sequences of the rollback step: the older manifest the host puts
# back, and the current one (distinct numbers, so a message naming them is told
# from one that happens to hold a 1 or a 2).
OLD_SEQUENCE, SEQUENCE = 1041, 1042


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
        # Sockets and the TPM's state: a short path (a socket path has at most 107
        # bytes) without spaces or commas (QEMU's and swtpm's option syntax).
        self.sockdir = None
        self.procs = []          # (name, Popen), each the leader of its own process group
        self.qemu = None
        self.seen = 0            # bytes of ctl/results already printed
        self.host_errors = {}
        self.rollback_manifest = self.dir / "manifest-old.json"
        self.host_files = set()  # what the host put in ctl/ before the boot
        self.boot_panic = ""     # set when a first boot panicked (boot)

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
            init_error = self.ctl / "init-error"
            if init_error.exists():
                raise Timeout(f"the guest could not start: {init_error.read_text().strip()}")
            if path.name != "finished" and (self.ctl / "finished").exists():
                raise Timeout(f"the guest finished while the host waited for {what}")
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

    # -- the run ------------------------------------------------------------------
    def prepare(self):
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for d in (self.share, self.ctl, self.dir / "keys"):
            d.mkdir(parents=True)
        ma.make_corpus(self.share)
        trust = ma.seal_share(self.share, self.dir / "keys")
        try:
            trust.update(self.seal_sequences(trust))
        except Exception as e:
            trust["rollback_error"] = f"{type(e).__name__}: {e}"
            self.host_errors["rollback-refused"] = trust["rollback_error"]
        # Pinned: the manifest the share holds now, whatever re-sealing it did.
        trust["digest"] = ma.vf("measure-manifest", self.share / trust["manifest"]).strip()
        # What the guest image would carry (attested): key, pinned manifest digest and
        # the minimum sequence.
        self.trust = trust
        (self.dir / "trust.json").write_text(json.dumps(trust))
        self.exp = ma.expected(self.share)
        (self.ctl / "expected.json").write_text(json.dumps(self.exp))
        # The verifier's challenge: the quote must carry it.
        self.nonce = os.urandom(20).hex()
        (self.ctl / plan.NONCE).write_text(self.nonce + "\n")
        self.nonce_after = os.urandom(20).hex()
        (self.ctl / plan.NONCE_AFTER).write_text(self.nonce_after + "\n")
        self.host_files = {p.name for p in self.ctl.iterdir()}

    def seal_sequences(self, trust: dict) -> dict:
        """Re-seal the manifest as OLD_SEQUENCE (kept aside for the rollback step), then
        as SEQUENCE (the current one, pinned); same key, same tree."""
        manifest = self.share / trust["manifest"]
        key = Path(trust["pub"]).with_name("key.pem")
        for seq in (OLD_SEQUENCE, SEQUENCE):
            ma.vf("seal", self.share, "--manifest", manifest, "--sign-key", key, "--sequence", seq)
            got = manifest_sequence(manifest)
            if got != seq:
                raise RuntimeError(f"sealed with --sequence {seq}, the manifest header says {got!r}")
            if seq == OLD_SEQUENCE:
                shutil.copyfile(manifest, self.rollback_manifest)
        return {"sequence": SEQUENCE, "old_sequence": OLD_SEQUENCE}

    def kernel(self) -> Path:
        found = sorted(glob.glob(str(self.build / "kernel" / "boot" / "vmlinuz-*")))
        if not found:
            raise SystemExit(f"no guest kernel in {self.build}/kernel/boot (make e2e fetches it)")
        return Path(found[-1])

    def start(self):
        a = self.args
        self.sockdir = Path(tempfile.mkdtemp(prefix="vf-e2e.", dir="/run"))
        tpmdir = self.sockdir / "tpm"
        tpmdir.mkdir()
        tpm_sock = tpmdir / "ctrl.sock"
        # No --flags startup-clear: the guest kernel starts the TPM.
        self.spawn("swtpm", ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tpmdir}",
                             "--ctrl", f"type=unixio,path={tpm_sock}"], self.dir / "swtpm.log")
        socks = {}
        for tag, source, cache in (("rootfs", "/", "auto"), ("share", self.share, "none"),
                                   ("ctl", self.ctl, "none")):
            socks[tag] = self.sockdir / f"{tag}.sock"
            self.spawn(f"virtiofsd[{tag}]",
                       [a.virtiofsd, f"--socket-path={socks[tag]}", "-o", f"source={source}",
                        "-o", f"cache={cache}", "-o", "sandbox=chroot"],
                       self.dir / f"virtiofsd-{tag}.log")
        deadline = time.monotonic() + 10
        while not all(s.exists() for s in [tpm_sock, *socks.values()]):
            self.check_alive("the virtiofsd and swtpm sockets")
            if time.monotonic() > deadline:
                raise Timeout("virtiofsd or swtpm sockets did not appear within 10 s")
            time.sleep(0.02)
        # Quoted: the kernel strips the quotes and keeps the spaces (validate_paths
        # refused a '"').
        cmdline = (f'console=ttyS0 loglevel=4 root=rootfs rootfstype=virtiofs ro panic=-1 '
                   f'init="{REPO}/e2e/guest-init.sh" vf_repo="{REPO}" vf_python="{sys.executable}" '
                   f'vf_run="{self.dir}" vf_step_timeout={a.step_timeout:.0f}')
        mem = a.memory
        cmd = [a.qemu, "-name", "verityfuse-e2e", "-nodefaults", "-no-user-config", "-no-reboot",
               "-accel", "tcg", "-cpu", "max", "-smp", str(a.smp), "-m", mem,
               "-object", f"memory-backend-memfd,id=mem,size={mem},share=on", "-numa", "node,memdev=mem",
               "-kernel", str(self.kernel()), "-append", cmdline,
               "-display", "none", "-serial", f"file:{qemu_escape(self.console)}",
               "-chardev", f"socket,id=chrtpm,path={tpm_sock}",
               "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis,tpmdev=tpm0"]
        for i, tag in enumerate(socks):
            cmd += ["-chardev", f"socket,id=vfs{i},path={socks[tag]}",
                    "-device", f"vhost-user-fs-pci,chardev=vfs{i},tag={tag}"]
        self.qemu = self.spawn("qemu", cmd, self.dir / "qemu.log")

    def put_back_old_manifest(self, share, exp):
        """The hostile host's rollback: the older signed manifest in place of the current."""
        if "rollback_error" in self.trust:
            raise RuntimeError(self.trust["rollback_error"])
        shutil.copyfile(self.rollback_manifest, share / self.trust["manifest"])

    def steps(self):
        actions = [(a.name, a.name, a.host) for a in ma.ATTACKS]
        actions.append((plan.ROLLBACK, "rollback-refused", self.put_back_old_manifest))
        assert [a[0] for a in actions] == plan.STEPS
        for n, (step, check, action) in enumerate(actions):
            name = self.wait_for(self.ctl / f"ready-{n}", self.args.step_timeout,
                                 f"the guest to be ready for {step}").strip()
            if name != step:
                raise Timeout(f"the guest is ready for {name!r}, the host expected {step!r}")
            try:
                action(self.share, self.exp)
                done = "ok"
            except Exception as e:
                traceback.print_exc()
                done = f"error: {type(e).__name__}: {e}"
                self.host_errors[check] = done
            tmp = self.ctl / f".done-{n}.tmp"
            tmp.write_text(done + "\n")
            os.rename(tmp, self.ctl / f"done-{n}")

    def boot(self) -> float:
        """Start the guest, wait until its init has started: the seconds that took.  Once
        more, said and with the console kept, if the kernel panicked before its init ran:
        under TCG a vCPU may run code the other vCPU is patching (6.12.118, 2026-12-06:
        "Oops: int3" in sched_clock_cpu 2.3 s into a boot; 0 in 60 boots without a root)."""
        for attempt in (1, 2):
            self.start()
            t_boot = time.monotonic()
            print(f"e2e: booting the guest (TCG; console: {self.console})", flush=True)
            try:
                self.wait_for(self.ctl / "booted", self.args.boot_timeout, "the guest to boot")
                return time.monotonic() - t_boot
            except Timeout as e:
                if attempt == 2 or not self.panicked_before_init():
                    raise
                kept = self.dir / "console-panicked.log"
                os.replace(self.console, kept)
                self.boot_panic = f"the first boot's kernel panicked ({e}; console: {kept})"
                print(f"e2e: {self.boot_panic}: booting once more", flush=True)
                self.stop_all()
                self.procs = []
                shutil.rmtree(self.sockdir, ignore_errors=True)
        raise AssertionError("unreachable")

    def panicked_before_init(self) -> bool:
        """The guest kernel panicked, and the guest's init had not written a line yet."""
        try:
            console = self.console.read_text(errors="replace")
        except FileNotFoundError:
            return False
        started = [p.name for p in self.ctl.iterdir() if p.name not in self.host_files]
        return "Kernel panic - not syncing" in console and not started

    def main(self) -> int:
        t_start = time.monotonic()
        failure = None
        boot = None
        print(f"e2e: preparing and sealing the share in {self.dir}", flush=True)
        self.prepare()
        try:
            boot = self.boot()
            print(f"e2e: guest booted in {boot:.1f} s; checks (guest side):", flush=True)
            self.steps()
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
            if self.sockdir is not None:
                shutil.rmtree(self.sockdir, ignore_errors=True)
        self.print_results()
        print("e2e: the host, as the remote verifier, appraises the guest's quote and event log:",
              flush=True)
        host = verifier.verify(self.ctl / plan.EVIDENCE, self.nonce, self.trust,
                               self.ctl / plan.EVIDENCE_AFTER, self.nonce_after)
        for name, ok, detail in host:
            print(f"  {'PASS' if ok else 'FAIL'}  {name:32} {detail[:160]}", flush=True)
        return self.report(failure, boot, time.monotonic() - t_start, host)

    def report(self, failure, boot, total, host) -> int:
        b = f"{boot:.1f} s" if boot is not None else "-"
        if self.boot_panic:
            b += f" (booted twice: {self.boot_panic})"
        logs = [(self.console, 60, "guest console"),
                (self.ctl / "verityfuse.log", 80, "guest verityfuse log")]
        if failure:
            logs += [(log, 10, log.name) for log in sorted(self.dir.glob("virtiofsd-*.log"))
                     + [self.dir / "swtpm.log", self.dir / "qemu.log"]]
        return report.summary(read_results(self.ctl), host, self.host_errors, failure, logs,
                              f"boot {b}, total {total:.0f} s; files in {self.dir}")


def manifest_sequence(path: Path):
    """The ``sequence`` of a signed manifest's header (protocol/manifest-format.md),
    or None."""
    envelope = json.loads(path.read_text())
    header = base64.b64decode(envelope["payload"]).split(b"\n", 1)[0]
    return json.loads(header).get("sequence")


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
    validate_paths(REPO, Path(args.build).resolve())
    # The host's verityfuse commands and the guest's (same interpreter, same root)
    # use this checkout, whichever venv runs this script.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                               [os.environ.get("PYTHONPATH")] if p])

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    sys.exit(Run(args).main())


if __name__ == "__main__":
    main()
