"""The guest's TPM, for ``make e2e``: an attestation key and a quote, with tpm2-tools.

The TPM is the host's swtpm, attached by QEMU (``-device tpm-tis``); the guest
kernel's driver and resource manager give ``/dev/tpmrm0``.  The tools run one
command each (tpm2-tools 5.4, device TCTI), in WORK (a tmpfs directory), so the
keys' context files never leave the guest; only the public parts and the quote
are copied to the results share.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

DEVICE = "/dev/tpmrm0"
PCR = 23
SELECTION = f"sha256:{PCR}"

# What the quote needs, as ``tpm2_quote`` and ``tpm2_createak`` write them:
# quote.msg (TPMS_ATTEST), quote.sig (TPMT_SIGNATURE), pcrs.out (the quoted PCR
# values), ak.pub (the AK as TPM2B_PUBLIC) and ak.pem (the same key as PEM).
EVIDENCE = ("quote.msg", "quote.sig", "pcrs.out", "ak.pub", "ak.pem")


class TpmError(RuntimeError):
    pass


def tool(work: Path, name: str, *args: str) -> str:
    env = dict(os.environ, TPM2TOOLS_TCTI=f"device:{DEVICE}")
    r = subprocess.run([name, *args], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        raise TpmError(f"{name} {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[:400]}")
    return r.stdout


def wait_for_device(timeout: float = 30.0):
    """The driver probes the TIS device at boot; the node appears in devtmpfs."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(DEVICE):
        if time.monotonic() > deadline:
            raise TpmError(f"no {DEVICE} after {timeout:.0f} s (is QEMU's -device tpm-tis there, "
                           "and the kernel's TPM driver built in?)")
        time.sleep(0.1)


def create_keys(work: Path) -> str:
    """An endorsement key and, under it, a restricted signing key (the AK)."""
    work.mkdir(parents=True, exist_ok=True)
    tool(work, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    tool(work, "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "rsa", "-g", "sha256",
         "-s", "rsassa", "-u", "ak.pub", "-n", "ak.name")
    tool(work, "tpm2_readpublic", "-c", "ak.ctx", "-f", "pem", "-o", "ak.pem")
    return "EK and AK (RSA 2048, RSASSA/SHA-256) created"


def read_pcr(work: Path) -> str:
    """PCR 23 of the SHA-256 bank, in hex."""
    tool(work, "tpm2_pcrread", SELECTION, "-o", "pcr.bin")
    return (work / "pcr.bin").read_bytes().hex()


def quote(work: Path, nonce_hex: str, dest: Path) -> str:
    """Quote PCR 23 with the host's nonce; copy the evidence to ``dest``."""
    tool(work, "tpm2_quote", "-c", "ak.ctx", "-l", SELECTION, "-q", nonce_hex,
         "-m", "quote.msg", "-s", "quote.sig", "-o", "pcrs.out", "-g", "sha256")
    dest.mkdir(parents=True, exist_ok=True)
    for name in EVIDENCE:
        shutil.copyfile(work / name, dest / name)
    return f"quote over {SELECTION} with the host's nonce; PCR 23 = {read_pcr(work)}"
