"""Command line for OCI registries: ``push`` (mounting is ``mount oci://REF``, cli_mount).

Registry options shared by push and mount: ``--plain-http`` (default HTTPS),
``--registry-ca CA.pem`` (the CA that signed the registry's certificate) and
``--registry-auth FILE`` (basic auth: ``USER:PASSWORD`` or a docker config.json;
by default the user's docker config.json, if it names the registry).
"""

from __future__ import annotations


from .jsonout import error

EXIT_ERROR = 1


def _docker_auth(config: dict, host: str):
    """The basic-auth pair a docker config.json holds for ``host`` (its "auths" keys may
    carry a scheme and a path), or None."""
    import base64

    for key, entry in (config.get("auths") or {}).items():
        name = key.split("://", 1)[-1].split("/", 1)[0]
        if name == host and isinstance(entry, dict) and isinstance(entry.get("auth"), str):
            user, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            if sep:
                return user, password
    return None


def credentials(host: str, path=None):
    """(user, password) for ``host``: from ``path`` (one line USER:PASSWORD, or a docker
    config.json), else from $DOCKER_CONFIG/config.json or ~/.docker/config.json if it has
    an entry for the host; None: no credentials."""
    import json
    import os

    from . import wholefile

    if path is None:
        home = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
        path = os.path.join(home, "config.json")
        if not os.path.exists(path):
            return None
    try:
        text = wholefile.read_regular(path, 1 << 20, what=path).decode("utf-8", "replace")
    except OSError as e:  # named as the other faults of the file are, without "[Errno N]"
        raise ValueError(f"{path}: {e.strerror}") from None
    if text.lstrip().startswith("{"):
        try:
            return _docker_auth(json.loads(text), host)
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a usable docker config.json ({e})") from None
    line = text.splitlines()[0] if text else ""
    user, sep, password = line.partition(":")
    if not sep or not user:
        raise ValueError(f"{path}: expected one line USER:PASSWORD or a docker config.json")
    return user, password


def make_client(ref, plain_http: bool = False, registry_ca=None, registry_auth=None,
                timeout: float = 10.0):
    from .oci_client import Client

    return Client(ref, https=not plain_http, ca_file=registry_ca,
                  auth=credentials(ref.host, registry_auth),
                  timeout=timeout)


def add_registry_options(p):
    p.add_argument("--plain-http", action="store_true",
                   help="talk HTTP, not HTTPS, to the registry (a registry on this machine)")
    p.add_argument("--registry-ca", metavar="CA.pem",
                   help="the CA certificate(s) the registry's TLS certificate must chain to")
    p.add_argument("--registry-auth", metavar="FILE",
                   help="basic-auth credentials for the registry: a file with one line "
                        "USER:PASSWORD, or a docker config.json (default: "
                        "$DOCKER_CONFIG/config.json or ~/.docker/config.json, if present)")


def cmd_push(args) -> int:
    from .oci_client import RegistryError
    from .oci_push import push
    from .oci_ref import parse_ref

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
