"""Where a mount's trust comes from, loaded before mounting (no pyfuse3/trio): the
manifest (authenticated by its key or pinned digest, not older than min_sequence), the
registry's artifact for an oci:// source, or local mode's certificates."""

from __future__ import annotations

from .mountopts import Settings


class Trust:
    """Where trusted digests and signatures come from, loaded before mounting."""

    def __init__(self, s: Settings, source: str = ""):
        from . import manifest, signature
        from .errors import ManifestError

        self.manifest = None
        self.remote = None  # an oci:// source: the fetched, authenticated artifact
        if is_oci(source):
            from .oci_source import remote_from_settings

            if s.manifest or s.trust_cert or s.require_signatures or s.store:
                raise ManifestError("oci:// serves the manifest the registry holds: manifest, "
                                    "store, trust_cert and require_signatures do not apply")
            self.remote = remote_from_settings(source, s)
            self.manifest = self.remote.manifest
            self.certs = []
            return
        if s.manifest:
            if s.trust_cert or s.require_signatures:
                raise ManifestError("trust_cert and require_signatures are for local mode; with a "
                                    "manifest, the manifest's signature is the trust")
            keys = [manifest.load_public_key(k) for k in s.trust_key]
            # Authenticated first, then refused if older than min_sequence or expired.
            self.manifest = manifest.load(s.manifest, keys, s.manifest_digest, s.min_sequence)
        elif s.trust_key or s.manifest_digest or s.min_sequence:
            raise ManifestError("trust_key, manifest_digest and min_sequence need a manifest")
        self.certs = signature.load_certificates(s.trust_cert)


def is_oci(source: str) -> bool:
    """A tree served from an OCI registry (oci://HOST[:PORT]/REPO[:TAG|@DIGEST])."""
    return source.startswith("oci://")
