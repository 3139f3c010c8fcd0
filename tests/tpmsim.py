"""A software TPM 2.0 (swtpm) on 127.0.0.1 for tests, and tpm2-tools pointed at it.

    with tpmsim.swtpm(tmp_path) as tpm:
        tpm.run("tpm2_pcrread", "sha256:23")             # tpm2-tools against this TPM
        os.environ.update(tpm.env)                        # or: TPM2TOOLS_TCTI for a daemon
        register = measure_registers.open_register("tpm:23")  # reads TPM2TOOLS_TCTI
        tpm.make_ak(tmp_path); tpm.quote(tmp_path, NONCE)  # ak.pub, ak.msg, ak.sig

Each TPM has a fresh state directory (so PCR 23 starts at zero and keys are new), free
ports picked by the kernel, and is always stopped (SIGTERM, then SIGKILL) when the block
ends, even on failure.  A plain helper like privns.py, so mount tests can reuse it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import time

import pytest

from conftest import PortTaken

SWTPM = shutil.which("swtpm")


@dataclasses.dataclass
class Tpm:
    port: int
    state_dir: str
    tcti: str

    @property
    def env(self) -> dict:
        """The environment a tpm2-tools command or a verityfuse daemon needs for this TPM."""
        return {"TPM2TOOLS_TCTI": self.tcti}

    def run(self, *cmd, check: bool = True, cwd=None, input=None) -> subprocess.CompletedProcess:
        """Run a tpm2-tools command against this TPM; failure shows its stderr."""
        r = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, cwd=cwd,
                           input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): "
                                 f"{r.stderr.decode(errors='replace')}")
        return r

    def run_flushed(self, *cmd, **kw) -> subprocess.CompletedProcess:
        """run, then flush transient objects: swtpm has no resource manager, and a tool that
        leaves its keys loaded soon fills the TPM ("out of memory for object contexts")."""
        r = self.run(*cmd, **kw)
        self.run("tpm2_flushcontext", "-t")
        return r

    def pcr_read(self, pcr: int = 23) -> bytes:
        """A SHA-256 PCR, as tpm2_pcrread reports it."""
        out = self.run("tpm2_pcrread", f"sha256:{pcr}").stdout.decode()
        return bytes.fromhex(out.split("0x")[1].strip())

    def make_ak(self, d, name: str = "ak", alg: str = "rsa", scheme: str = "rsassa",
                fmt: str = "tss") -> str:
        """An EK (once per directory) and an AK under it: d/NAME.ctx and d/NAME.pub (TPM2B_PUBLIC
        with fmt "tss", PEM with "pem"); returns the public key's path."""
        d = str(d)
        if not os.path.exists(os.path.join(d, "ek.ctx")):
            self.run_flushed("tpm2_createek", "-c", f"{d}/ek.ctx", "-G", "rsa", "-u", f"{d}/ek.pub")
        self.run_flushed("tpm2_createak", "-C", f"{d}/ek.ctx", "-c", f"{d}/{name}.ctx", "-G", alg,
                         "-g", "sha256", "-s", scheme, "-u", f"{d}/{name}.pub", "-f", fmt)
        return f"{d}/{name}.pub"

    def quote(self, d, nonce_hex: str, name: str = "ak", pcrs: str = "sha256:23",
              scheme: str = "rsassa") -> tuple[str, str]:
        """tpm2_quote with the AK make_ak made: (d/NAME.msg, d/NAME.sig)."""
        d = str(d)
        self.run_flushed("tpm2_quote", "-c", f"{d}/{name}.ctx", "-l", pcrs, "-q", nonce_hex,
                         "-m", f"{d}/{name}.msg", "-s", f"{d}/{name}.sig", "-g", "sha256",
                         "--scheme", scheme)
        return f"{d}/{name}.msg", f"{d}/{name}.sig"


def _two_free_ports() -> int:
    """A port P with P+1 also free (swtpm's server and control channels)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p >= 65535:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free TCP ports on 127.0.0.1")


def _wait_ready(proc: subprocess.Popen, port: int, log: str):
    """Until swtpm accepts a connection on its control port (it exits on a bad setup)."""
    for _ in range(500):
        if proc.poll() is not None:
            with open(log, errors="replace") as f:
                text = f.read()
            kind = PortTaken if "Address already in use" in text else RuntimeError
            raise kind(f"swtpm exited with {proc.returncode}: {text}")
        try:
            with socket.create_connection(("127.0.0.1", port + 1), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("swtpm did not start listening within 10 s")


@contextlib.contextmanager
def swtpm(tmp):
    """Start a TPM 2.0 simulator with its state under ``tmp``; yields a Tpm."""
    if SWTPM is None:
        pytest.skip("swtpm is not installed (Debian: swtpm swtpm-tools)")
    state = os.path.join(str(tmp), "swtpm-state")
    os.makedirs(state, exist_ok=True)
    log = os.path.join(state, "swtpm.log")
    # The ports are free when picked and bound by swtpm a moment later: another process
    # may take one in between, so a start that finds one taken picks others, twice at most.
    for attempt in range(3):
        for name in os.listdir(state):  # a fresh TPM each attempt, and only its log read
            os.unlink(os.path.join(state, name))
        port = _two_free_ports()
        proc = subprocess.Popen(
            [SWTPM, "socket", "--tpm2", "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1", "--flags", "startup-clear",
             "--tpmstate", f"dir={state}", "--log", f"file={log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_ready(proc, port, log)
            break
        except PortTaken:
            proc.wait()
            if attempt == 2:
                raise
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    try:
        yield Tpm(port, state, f"swtpm:host=127.0.0.1,port={port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
