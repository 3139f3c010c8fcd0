"""The OCI artifact that carries a sealed tree (protocol/oci-artifact.md); pure.

An OCI image manifest whose config is the signed verityfuse manifest file and
whose layers are, per distinct fs-verity digest, the tree object (the store's
``header || descriptor || tree``) and the file's bytes, uncompressed so that
a reader can fetch any block by byte range.  Each such layer is annotated
with the fs-verity digest it belongs to.

Nothing here is trusted: the OCI manifest only tells a reader where to look.
The signed manifest is authenticated (signature or pin over its raw bytes),
each tree object must hash to its manifest digest, and each data block to its
tree; a wrong mapping, a wrong size or a missing layer costs availability,
never integrity.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

ARTIFACT_TYPE = "application/vnd.verityfuse.manifest.v1+json"
MANIFEST_TYPE = ARTIFACT_TYPE  # the config blob: the signed manifest file itself
TREE_TYPE = "application/vnd.verityfuse.tree.v1"
DATA_TYPE = "application/vnd.verityfuse.data.v1"
DIGEST_ANNOTATION = "io.verityfuse.fsverity-digest"
MANIFEST_DIGEST_ANNOTATION = "io.verityfuse.manifest-digest"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MAX_OCI_MANIFEST = 64 << 20  # read no more of an untrusted OCI manifest
_BLOB_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ArtifactError(ValueError):
    """An OCI manifest that is not a verityfuse artifact (the message says why)."""


@dataclass(frozen=True)
class Blob:
    digest: str  # sha256:<hex> of the blob's bytes (a registry address, nothing more)
    size: int


@dataclass
class Artifact:
    manifest: Blob                                           # the signed manifest file
    trees: Dict[str, Blob] = field(default_factory=dict)    # fs-verity digest -> tree object
    data: Dict[str, Blob] = field(default_factory=dict)     # fs-verity digest -> file bytes


def descriptor(media_type: str, blob: Blob, fsverity_digest: Optional[str] = None) -> dict:
    d: dict = {"mediaType": media_type, "digest": blob.digest, "size": blob.size}
    if fsverity_digest is not None:
        d["annotations"] = {DIGEST_ANNOTATION: fsverity_digest}
    return d


def build(art: Artifact, manifest_digest: str) -> bytes:
    """The OCI image manifest's bytes (layers in a fixed order: one tree has one)."""
    layers: List[dict] = []
    for fsv in sorted(art.trees):
        layers.append(descriptor(TREE_TYPE, art.trees[fsv], fsv))
        if fsv in art.data:
            layers.append(descriptor(DATA_TYPE, art.data[fsv], fsv))
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": descriptor(MANIFEST_TYPE, art.manifest), "layers": layers,
           "annotations": {MANIFEST_DIGEST_ANNOTATION: manifest_digest}}
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _blob(d, where: str) -> Blob:
    if not isinstance(d, dict):
        raise ArtifactError(f"{where} is not a descriptor")
    digest, size = d.get("digest"), d.get("size")
    # The digest goes into a URL: only sha256:<hex> is accepted.
    if not isinstance(digest, str) or not _BLOB_DIGEST.match(digest):
        raise ArtifactError(f"{where}: digest {str(digest)[:80]!r} is not sha256:<64 hex digits>")
    if type(size) is not int or size < 0:
        raise ArtifactError(f"{where}: size {str(size)[:40]!r} is not a non-negative integer")
    return Blob(digest, size)


# The least a JSON value of a real artifact takes in its bytes: a layer descriptor is ~230
# bytes of ~10 values (~50 with push's indentation).  What the untrusted registry sends is
# parsed only if its values are this large on average: 64 MiB of "[{},{},...]" made 1.7 GB
# of Python objects before anything was authenticated; at 16 bytes a value, the objects
# made stay within a few times the body.  (Below a MiB, the parse's own messages say more.)
MIN_BYTES_PER_VALUE = 16
CHECKED_FROM = 1 << 20


def parse(body: bytes) -> Artifact:
    """The blobs an OCI manifest names.  Layers of other types are ignored; the first
    layer of a type for a digest wins (the others could only be wrong)."""
    values = body.count(b",") + body.count(b"{") + body.count(b"[") + 1
    if len(body) > CHECKED_FROM and values * MIN_BYTES_PER_VALUE > len(body):
        raise ArtifactError(f"{values} JSON values in {len(body)} bytes: not a verityfuse "
                            f"artifact's manifest (refused unparsed)")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("schemaVersion") != 2:
        raise ArtifactError("not an OCI image manifest (schemaVersion 2)")
    config = doc.get("config")
    if not isinstance(config, dict) or config.get("mediaType") != MANIFEST_TYPE:
        raise ArtifactError(f"not a verityfuse artifact: the config is not a {MANIFEST_TYPE}")
    art = Artifact(_blob(config, "config"))
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ArtifactError("layers is not a list")
    for n, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise ArtifactError(f"layers[{n}] is not a descriptor")
        kind = {TREE_TYPE: art.trees, DATA_TYPE: art.data}.get(str(layer.get("mediaType")))
        ann = layer.get("annotations")
        fsv = ann.get(DIGEST_ANNOTATION) if isinstance(ann, dict) else None
        if kind is None or not isinstance(fsv, str):
            continue
        kind.setdefault(fsv, _blob(layer, f"layers[{n}]"))
    return art
