"""Mirror of the kernel's fs-verity ABI (include/uapi/linux/fsverity.h), and of the
inode-flag ioctls a verity file answers (include/uapi/linux/fs.h): every ioctl number here.

Names follow the kernel so that grepping either side finds the other.
"""

import struct

FS_VERITY_HASH_ALG_SHA256 = 1
FS_VERITY_HASH_ALG_SHA512 = 2

FS_IOC_ENABLE_VERITY = 0x40806685
FS_IOC_MEASURE_VERITY = 0xC0046686
FS_IOC_READ_VERITY_METADATA = 0xC0286687
FS_IOC_GETFLAGS = 0x80086601
# FS_IOC_GETFLAGS is _IOR('f', 1, long) but carries an int; the 32-bit compat numbers too.
FS_IOC32_GETFLAGS = 0x80046601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC32_SETFLAGS = 0x40046602
# struct fsxattr: xflags, extsize, nextents, projid, cowextsize, pad[8]
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820
FSXATTR_SIZE = 28
FS_XFLAG_VERITY = 0x00020000  # read-only, as in the kernel (2026)

FS_VERITY_METADATA_TYPE_MERKLE_TREE = 1
FS_VERITY_METADATA_TYPE_DESCRIPTOR = 2
FS_VERITY_METADATA_TYPE_SIGNATURE = 3

FS_VERITY_FL = 0x00100000
# Backing-file flags worth passing through to lsattr.
FS_IMMUTABLE_FL = 0x00000010
FS_APPEND_FL = 0x00000020

FS_VERITY_MAX_DESCRIPTOR_SIZE = 16384
FS_VERITY_DESCRIPTOR_SIZE = 256
FS_VERITY_MAX_SIGNATURE_SIZE = FS_VERITY_MAX_DESCRIPTOR_SIZE - FS_VERITY_DESCRIPTOR_SIZE
FS_VERITY_MAX_SALT_SIZE = 32
FS_VERITY_MAX_DIGEST_SIZE = 64
# The kernel refuses trees deeper than this (EFBIG).
FS_VERITY_MAX_LEVELS = 8

# struct fsverity_descriptor: version, hash_algorithm, log_blocksize, salt_size,
# sig_size (reserved in uapi), data_size, root_hash[64], salt[32], reserved[144].
DESCRIPTOR_STRUCT = struct.Struct("<BBBBIQ64s32s144s")
assert DESCRIPTOR_STRUCT.size == FS_VERITY_DESCRIPTOR_SIZE

# struct fsverity_enable_arg (128 bytes).
ENABLE_ARG_STRUCT = struct.Struct("<IIIIQIIQ88s")
assert ENABLE_ARG_STRUCT.size == 128

# struct fsverity_digest header: digest_algorithm, digest_size.
DIGEST_HEADER_STRUCT = struct.Struct("<HH")
