"""fs-verity Merkle trees, byte-identical to the kernel's (pure, stdlib only).

Format (Documentation/filesystems/fsverity.rst): every B-byte data block,
the last one zero-padded, is hashed as H(padded_salt || block); the hashes are
packed into B-byte tree blocks (zero-padded), which are hashed the same way,
level by level, until one block remains.  The root hash is the hash of that
block (or of the only data block; all zeros for an empty file).  The tree is
stored root level first.  The file digest is H(256-byte descriptor).

Building a tree from a file is treebuild's.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Callable, Dict, Optional, Tuple

from . import hashers, uapi
from .errors import Corruption, FileTooLarge, InvalidDescriptor, InvalidParameters, SaltTooLong

# Re-exported: which engine the hashers use, and the salt as they hash it.
NATIVE = hashers.NATIVE
_hashblocks = hashers._hashblocks
padded_salt = hashers.padded_salt


class _Value:
    """Immutable, equal and hashed by its fields (``__slots__``): what a frozen
    dataclass gives, without importing dataclasses and generating code, which was
    ~9 ms of every command's start-up (`digest` among them).  Creating and
    comparing one costs about what a frozen dataclass does (0.3-0.8 us)."""

    __slots__: Tuple[str, ...] = ()
    _fields: Callable[[Any], tuple]  # the fields, as a tuple: operator.attrgetter
    _setters: Tuple[Callable[[Any, Any], None], ...]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._fields = staticmethod(attrgetter(*cls.__slots__))
        # The slots' own setters: they bypass __setattr__ (which refuses) without
        # object.__setattr__'s lookup by name (a descriptor is built per open).
        cls._setters = tuple(getattr(cls, name).__set__ for name in cls.__slots__)

    def _set(self, *values) -> None:
        for setter, value in zip(self._setters, values):
            setter(self, value)

    def __eq__(self, other) -> bool:
        return other is self or (type(other) is type(self) and
                                 self._fields(self) == other._fields(other))

    def __hash__(self) -> int:
        return hash(self._fields(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__slots__) + ")"

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")

    def __reduce__(self):  # through a pipe (seal_pool's workers): the fields, set again
        return _rebuilt, (type(self), tuple(getattr(self, n) for n in self.__slots__))


def _rebuilt(cls, values):
    value = object.__new__(cls)
    value._set(*values)
    return value


class HashAlg(_Value):
    __slots__ = ("name", "number", "digest_size", "block_size")
    name: str
    number: int  # FS_VERITY_HASH_ALG_*
    digest_size: int
    block_size: int  # the compression function's block: the salt pads to it

    def __init__(self, name: str, number: int, digest_size: int, block_size: int):
        self._set(name, number, digest_size, block_size)

    def new(self):
        import hashlib  # not at start-up: a command hashing natively never needs it

        return hashlib.new(self.name)

    def __reduce__(self):  # through a pipe (seal_pool's workers): the one object of its name
        return hash_alg, (self.name,)


SHA256 = HashAlg("sha256", uapi.FS_VERITY_HASH_ALG_SHA256, 32, 64)
SHA512 = HashAlg("sha512", uapi.FS_VERITY_HASH_ALG_SHA512, 64, 128)
ALGORITHMS = {a.name: a for a in (SHA256, SHA512)}
ALGORITHMS_BY_NUMBER = {a.number: a for a in (SHA256, SHA512)}

DEFAULT_BLOCK_SIZE = 4096
# The largest block size verityfuse enables, reads from a store or accepts in a
# manifest: a userspace server is not bound by pages (the kernel stops at the
# page size), and 64 KiB is fsverity-utils' largest test.  It also bounds what
# one read may cost: a tree block is read whole.
MAX_BLOCK_SIZE = 65536
# fsverity-utils allows 64 levels; the kernel allows 8 and answers EFBIG past that.
MAX_LEVELS = uapi.FS_VERITY_MAX_LEVELS


def hash_alg(name_or_number) -> HashAlg:
    """Look up an algorithm by name ("sha256") or fs-verity number (1)."""
    if isinstance(name_or_number, int):
        alg = ALGORITHMS_BY_NUMBER.get(name_or_number)
    else:
        alg = ALGORITHMS.get(str(name_or_number).lower())
    if alg is None:
        raise InvalidParameters(
            f"unknown hash algorithm: {name_or_number!r} "
            f"(available: {' '.join(ALGORITHMS)})"
        )
    return alg


class Params(_Value):
    """Tree parameters: what `fsverity digest --hash-alg --block-size --salt` sets."""

    __slots__ = ("alg", "block_size", "salt")
    alg: HashAlg
    block_size: int
    salt: bytes

    def __init__(self, alg: HashAlg = SHA256, block_size: int = DEFAULT_BLOCK_SIZE,
                 salt: bytes = b""):
        self._set(alg, block_size, salt)
        bs = block_size
        if not isinstance(bs, int) or bs <= 0 or bs & (bs - 1):
            raise InvalidParameters(f"invalid block size {bs}: must be a power of 2")
        if bs < 2 * self.alg.digest_size:
            raise InvalidParameters(
                f"block size ({bs}) too small for hash algorithm {self.alg.name}"
            )
        # log_blocksize is a u8 and block_size a u32 in the ABI.
        if bs > 1 << 31:
            raise InvalidParameters(f"invalid block size {bs}: too large")
        if len(self.salt) > uapi.FS_VERITY_MAX_SALT_SIZE:
            raise SaltTooLong(
                f"unsupported salt size ({len(self.salt)}): at most "
                f"{uapi.FS_VERITY_MAX_SALT_SIZE} bytes"
            )

    @property
    def log_blocksize(self) -> int:
        return self.block_size.bit_length() - 1

    @property
    def hashes_per_block(self) -> int:
        return self.block_size // self.alg.digest_size

    # The hashing engines (hashers.py): native where built, else hashlib.
    def block_hasher(self) -> Callable[[bytes], bytes]:
        """h(block) -> H(padded_salt || block)."""
        return hashers.block_hasher(self)

    def blocks_hasher(self, threads: int = 0) -> Callable[[Any], bytes]:
        """hb(buf) -> the concatenated hashes of every whole block of ``buf``."""
        return hashers.blocks_hasher(self, threads)

    def blocks_verifier(self, threads: int = 0) -> Callable[[Any, Any], int]:
        """vb(buf, expected) -> -1, or the index of the first block not matching."""
        return hashers.blocks_verifier(self, threads)

    def read_verifier(self, threads: int = 0) -> Callable[..., int]:
        """rv(buf, expected, fd, offset, length, flags=0): pread, then as blocks_verifier."""
        return hashers.read_verifier(self, threads)

    def describe(self) -> str:
        return f"{self.alg.name}, block size {self.block_size}, salt {self.salt.hex() or '(none)'}"


class Geometry(_Value):
    """Where every level of a file's tree lives.

    ``level_start[i]`` is the index (in tree blocks, from the start of the
    serialized tree) of level i's first block; level 0 hashes the data and is
    stored last, the top level is stored first.
    """

    __slots__ = ("params", "data_size", "num_data_blocks", "level_blocks", "level_start")
    params: Params
    data_size: int
    num_data_blocks: int
    level_blocks: tuple  # blocks per level, level 0 first
    level_start: tuple

    def __init__(self, params: Params, data_size: int, num_data_blocks: int,
                 level_blocks: tuple, level_start: tuple):
        self._set(params, data_size, num_data_blocks, level_blocks, level_start)

    @classmethod
    def compute(cls, params: Params, data_size: int) -> "Geometry":
        if data_size < 0:
            raise InvalidParameters(f"negative file size {data_size}")
        bs = params.block_size
        if data_size <= bs:  # no tree (most files of an image): no level to count
            return cls(params, data_size, 1 if data_size else 0, (), ())
        hpb = params.hashes_per_block
        n = -(-data_size // bs)
        data_blocks = n
        level_blocks = []
        while n > 1:
            n = -(-n // hpb)
            level_blocks.append(n)
            if len(level_blocks) > MAX_LEVELS:
                raise FileTooLarge(
                    f"file of {data_size} bytes needs more than {MAX_LEVELS} tree levels "
                    f"with {params.describe()}"
                )
        starts = [0] * len(level_blocks)
        offset = 0
        for level in reversed(range(len(level_blocks))):
            starts[level] = offset
            offset += level_blocks[level]
        return cls(params, data_size, data_blocks, tuple(level_blocks), tuple(starts))

    @property
    def num_levels(self) -> int:
        return len(self.level_blocks)

    @property
    def tree_blocks(self) -> int:
        return sum(self.level_blocks)

    @property
    def tree_size(self) -> int:
        return self.tree_blocks * self.params.block_size


def make_descriptor(params: Params, data_size: int, root_hash: bytes, sig_size: int = 0) -> bytes:
    """The 256-byte fsverity_descriptor (sig_size must be 0 for hashing)."""
    return uapi.DESCRIPTOR_STRUCT.pack(
        1, params.alg.number, params.log_blocksize, len(params.salt), sig_size,
        data_size, root_hash, params.salt, b"",
    )


class TreeId(_Value):
    """Which Merkle tree a file has: its parameters, the data size it covers and the
    fs-verity file digest (the hash of the descriptor those make with the root hash).

    The one record of it: a tree object gives one (``StoredTree.tree_id``), a manifest
    entry one (``manifest_tree.Node.tree``).  The digest alone names the tree (store
    objects are content-addressed by it); the parameters and size are what the record's
    holder was told, and ``check`` says whether a tree object agrees.
    """

    __slots__ = ("params", "data_size", "digest")
    params: Params
    data_size: int
    digest: bytes

    def __init__(self, params: Params, data_size: int, digest: bytes):
        self._set(params, data_size, digest)

    @property
    def alg(self) -> HashAlg:
        return self.params.alg

    @property
    def text(self) -> str:
        """``sha256:<hex>``."""
        return format_digest(self.params.alg, self.digest)

    def check(self, desc: "Descriptor", label: str) -> None:
        """Corruption unless ``desc``, the descriptor of the tree object opened by this
        digest (so hashing to it), has this record's size and parameters: a record that
        disagrees with its own digest names no tree."""
        if desc.data_size != self.data_size or desc.params != self.params:
            raise Corruption(f"{label}: its digest {self.text} names a tree of {desc.data_size} "
                             f"bytes ({desc.params.describe()}), not {self.data_size} bytes "
                             f"({self.params.describe()})", label)


class Descriptor(_Value):
    __slots__ = ("params", "data_size", "root_hash", "raw")
    params: Params
    data_size: int
    root_hash: bytes
    raw: bytes  # exactly 256 bytes, sig_size 0: what the digest covers

    def __init__(self, params: Params, data_size: int, root_hash: bytes, raw: bytes):
        self._set(params, data_size, root_hash, raw)

    @classmethod
    def build(cls, params: Params, data_size: int, root_hash: bytes) -> "Descriptor":
        """The descriptor of a tree built (or rebuilt) from its parts, its bytes packed."""
        return cls(params, data_size, root_hash, make_descriptor(params, data_size, root_hash))

    @property
    def digest(self) -> bytes:
        return file_digest(self.params.alg, self.raw)

    @property
    def geometry(self) -> Geometry:
        return Geometry.compute(self.params, self.data_size)


def _nonzero(b: bytes) -> bool:
    # A compare with zeros, not any(): one memcmp instead of a loop over the bytes.
    return b != bytes(len(b))


# Every descriptor of one store or manifest has the same few parameters: each Params
# is made (and checked) once.  Bounded: cleared when full (salts may differ per file).
_PARAMS: Dict[tuple, Params] = {}
_PARAMS_MAX = 64


def _params(alg_no: int, log_bs: int, salt: bytes) -> Params:
    key = (alg_no, log_bs, salt)
    params = _PARAMS.get(key)
    if params is None:
        params = Params(hash_alg(alg_no), 1 << log_bs, salt)
        if len(_PARAMS) >= _PARAMS_MAX:
            _PARAMS.clear()
        _PARAMS[key] = params
    return params


def parse_descriptor(raw: bytes) -> Descriptor:
    """Validate a descriptor as the kernel does on open; InvalidDescriptor if not."""
    if len(raw) != uapi.FS_VERITY_DESCRIPTOR_SIZE:
        raise InvalidDescriptor(f"descriptor is {len(raw)} bytes, expected 256")
    (version, alg_no, log_bs, salt_size, sig_size, data_size,
     root, salt, reserved) = uapi.DESCRIPTOR_STRUCT.unpack(raw)
    if version != 1:
        raise InvalidDescriptor(f"unsupported descriptor version {version}, expected 1")
    if sig_size != 0 or _nonzero(reserved):
        raise InvalidDescriptor("reserved descriptor bytes are not zero")
    if salt_size > uapi.FS_VERITY_MAX_SALT_SIZE:
        raise InvalidDescriptor(f"invalid salt size {salt_size}, at most {uapi.FS_VERITY_MAX_SALT_SIZE}")
    if _nonzero(salt[salt_size:]):
        raise InvalidDescriptor(f"invalid salt: bytes past its size {salt_size} are not zero")
    if log_bs > 31:
        raise InvalidDescriptor(f"invalid log_blocksize {log_bs}, at most 31")
    try:
        params = _params(alg_no, log_bs, salt[:salt_size])
    except InvalidParameters as e:
        raise InvalidDescriptor(f"invalid descriptor parameters: {e}") from None
    if _nonzero(root[params.alg.digest_size:]):
        raise InvalidDescriptor("root hash padding is not zero")
    return Descriptor(params, data_size, root[: params.alg.digest_size], bytes(raw))


def checked_descriptor(alg_no: int, log_bs: int, salt: bytes, data_size: int,
                       root_hash: bytes, raw: bytes) -> Descriptor:
    """The Descriptor of ``raw`` from its fields, which the caller has checked as
    parse_descriptor checks them (store_index's native parser of index entries)."""
    return Descriptor(_params(alg_no, log_bs, salt), data_size, root_hash, raw)


def file_digest(alg: HashAlg, descriptor: bytes) -> bytes:
    """The fs-verity file digest: H(descriptor), never salted."""
    return hashers.digest(alg.name, descriptor)


def format_digest(alg: HashAlg, digest: bytes) -> str:
    """``sha256:<hex>``, the form `fsverity digest` and `measure` print."""
    return f"{alg.name}:{digest.hex()}"


class BadDigest(ValueError):
    """Text that is not ``<algorithm>:<hex>``. ``part`` says what is wrong (``"prefix"``,
    ``"algorithm"``, ``"hex"``, ``"length"``), so a caller can word it its own way; ``alg``
    is the algorithm when the prefix named one."""

    def __init__(self, message: str, part: str, alg: Optional[HashAlg] = None) -> None:
        super().__init__(message)
        self.part, self.alg = part, alg


def parse_digest(text: str) -> Tuple[HashAlg, bytes]:
    """``sha256:<hex>`` -> (HashAlg, bytes), the one digest parser (the store's index, the
    manifest, ``--manifest-digest``, ``Digest.parse``); BadDigest, a ValueError, if bad."""
    name, sep, hexd = text.partition(":")
    if not sep:
        raise BadDigest(f"digest {text!r} has no algorithm prefix", "prefix")
    alg = ALGORITHMS.get(name)
    if alg is None:
        raise BadDigest(f"digest {text!r}: unknown algorithm {name!r}", "algorithm")
    try:
        raw = bytes.fromhex(hexd)
    except ValueError:
        raise BadDigest(f"digest {text!r} is not hexadecimal", "hex", alg) from None
    if len(raw) != alg.digest_size:
        raise BadDigest(f"digest {text!r} has {len(raw)} bytes, expected {alg.digest_size}",
                        "length", alg)
    return alg, raw


def formatted_digest(alg: HashAlg, digest: bytes) -> bytes:
    """struct fsverity_formatted_digest, what built-in signatures sign."""
    return b"FSVerity" + uapi.DIGEST_HEADER_STRUCT.pack(alg.number, len(digest)) + digest
