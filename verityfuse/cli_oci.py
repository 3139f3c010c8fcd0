"""Command line for OCI registries: ``push`` (mounting is ``mount oci://REF``, cli_mount).

Registry options shared by push and mount: ``--plain-http`` (default HTTPS),
``--registry-ca CA.pem`` (the CA that signed the registry's certificate) and
``--registry-auth FILE`` (basic auth: one line ``USER:PASSWORD``).
"""

from __future__ import annotations

import sys

EXIT_ERROR = 1


def error(msg: str):
    print(f"ERROR: {msg}", file=sys.stderr)


def read_auth(path):
    """(user, password) from a file holding ``USER:PASSWORD`` on its first line."""
    if not path:
        return None
    from . import fsutil

    line = fsutil.read_regular(path, 4096, what=path).decode("utf-8", "replace").splitlines()
    user, sep, password = (line[0] if line else "").partition(":")
    if not sep or not user:
        raise ValueError(f"{path}: expected one line USER:PASSWORD")
    return user, password


def make_client(ref, plain_http: bool = False, registry_ca=None, registry_auth=None,
                timeout: float = 10.0):
    from .oci_client import Client

    return Client(ref, https=not plain_http, ca_file=registry_ca, auth=read_auth(registry_auth),
                  timeout=timeout)


def add_registry_options(p):
    p.add_argument("--plain-http", action="store_true",
                   help="talk HTTP, not HTTPS, to the registry (a registry on this machine)")
    p.add_argument("--registry-ca", metavar="CA.pem",
                   help="the CA certificate(s) the registry's TLS certificate must chain to")
    p.add_argument("--registry-auth", metavar="FILE",
                   help="basic-auth credentials for the registry: one line USER:PASSWORD")


def cmd_push(args) -> int:
    from .oci_client import RegistryError, parse_ref
    from .oci_push import push

    try:
        ref = parse_ref(args.ref)
    except ValueError as e:
        error(str(e))
        return 2
    if ref.digest:
        error(f"{args.ref}: push to a tag (the artifact's digest is printed once pushed)")
        return 2
    try:
        client = make_client(ref, args.plain_http, args.registry_ca, args.registry_auth)
    except (ValueError, OSError) as e:
        error(str(e))
        return EXIT_ERROR
    try:
        r = push(args.source, args.manifest, client, ref.tag or "latest", store_path=args.store)
    except RegistryError as e:
        error(f"push to {ref}: {e}")
        return EXIT_ERROR
    finally:
        client.close()
    print(f"pushed {ref.host}/{ref.repo}:{ref.tag or 'latest'}@{r.oci_digest}")
    print(f"manifest digest {r.manifest_digest}")
    print(f"{r.uploaded} blobs uploaded ({r.uploaded_bytes} bytes), {r.present} already present")
    return 0


def add_commands(sub):
    p = sub.add_parser("push", help="publish a sealed tree and its manifest to an OCI registry")
    p.add_argument("source", metavar="SOURCE", help="the sealed directory")
    p.add_argument("ref", metavar="REF", help="HOST[:PORT]/REPO[:TAG] (default tag: latest)")
    p.add_argument("--manifest", metavar="M", required=True,
                   help="the signed manifest `seal --manifest` wrote for SOURCE")
    p.add_argument("--store", metavar="DIR", help="the store (default SOURCE/.verityfuse)")
    add_registry_options(p)
    p.set_defaults(func=cmd_push)
