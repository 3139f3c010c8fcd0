"""The push half of the distribution API (``Client``'s): blobs and manifests uploaded.

A mixin: ``request``, ``_plain``, ``base`` and ``ref`` are the Client's."""

from __future__ import annotations

import functools
import urllib.parse
from typing import IO, TYPE_CHECKING, Any, Callable, List, Optional

from .oci_http import (OCI_MANIFEST, RegistryError, content_length, discard, leaves_tls,
                       sha256_digest)


class Uploads:
    if TYPE_CHECKING:  # what Client provides
        base: str
        ref: Any

        def request(self, method: str, path: str, what: str, headers=None, body=None,
                    ok=(200,), tries=None) -> Any: ...

        def _plain(self, what: str, url: str) -> RegistryError: ...

        def _blob_path(self, digest: str) -> str: ...

    def blob_size(self, digest: str) -> Optional[int]:
        """HEAD a blob: its size if the repository has it, None if not."""
        r = self.request("HEAD", self._blob_path(digest), f"blob {digest}", ok=(200, 404))
        discard(r)
        if r.status == 404:
            return None
        size = content_length(r)
        if size is None:
            raise RegistryError(f"blob {digest}: {self.ref.host} answered a HEAD with "
                                f"Content-Length {r.headers.get('Content-Length', '')[:40]!r}")
        return size

    def upload_blob(self, digest: str, size: int, open_body: Callable[[], IO[bytes]],
                    chunk_size: int = 64 << 20):
        """Upload a blob whose bytes ``open_body()`` reads from the start: monolithic
        (POST, then PUT ?digest= with the body), or chunked for blobs over ``chunk_size``
        (PATCH with Content-Range per chunk, then PUT ?digest=)."""
        what = f"upload of blob {digest}"
        r = self.request("POST", f"/v2/{self.ref.repo}/blobs/uploads/", what, ok=(202,))
        discard(r)
        location = self._location(r, what)
        if size > chunk_size:
            with open_body() as f:
                for start in range(0, size, chunk_size):
                    f.seek(start)
                    data = f.read(min(chunk_size, size - start))
                    r = self.request("PATCH", location, what, body=functools.partial(bytes, data),
                                     ok=(202,),
                                     headers={"Content-Type": "application/octet-stream",
                                              "Content-Range": f"{start}-{start + len(data) - 1}",
                                              "Content-Length": str(len(data))})
                    discard(r)
                    location = self._location(r, what)
            body, length = None, 0
        else:
            body, length = open_body, size
        files: List[IO[bytes]] = []

        def stream():
            for f in files:
                f.close()
            files.append(body())
            return files[-1]

        try:
            r = self.request("PUT", _add_query(location, "digest", digest), what, ok=(201,),
                             body=(lambda: b"") if body is None else stream,
                             headers={"Content-Type": "application/octet-stream",
                                      "Content-Length": str(length)})
            discard(r)
        finally:
            for f in files:
                f.close()

    def _location(self, r, what: str) -> str:
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryError(f"{what}: the registry gave no upload Location")
        url = urllib.parse.urljoin(self.base + "/", loc)
        if leaves_tls(self.base, url):
            raise self._plain(what, url)
        return url

    def put_manifest(self, reference: str, body: bytes, media_type: str = OCI_MANIFEST) -> str:
        """PUT a manifest by tag or digest; returns its digest."""
        digest = sha256_digest(body)
        r = self.request("PUT", f"/v2/{self.ref.repo}/manifests/{reference}",
                         f"manifest {reference}", body=lambda: body, ok=(201,),
                         headers={"Content-Type": media_type})
        discard(r)
        said = r.headers.get("Docker-Content-Digest")
        if said and said != digest:
            raise RegistryError(f"manifest {reference}: the registry says its digest is {said}, "
                                f"the bytes sent hash to {digest}")
        return digest


def _add_query(url: str, key: str, value: str) -> str:
    sep = "&" if urllib.parse.urlsplit(url).query else "?"
    return f"{url}{sep}{urllib.parse.urlencode({key: value})}"
