/* SPDX-License-Identifier: MIT */
/*
 * FUSE_FSVERITY: fs-verity metadata between a FUSE server and its client.
 * Wire definitions of protocol/fuse-fsverity.md, version 1 (proposed; the
 * numbers below are not assigned by the kernel and are marked as such).
 *
 * All fields are little-endian.  Every reserved field and every undefined
 * flag bit must be zero; a receiver answers EINVAL otherwise.
 */
#ifndef FUSE_FSVERITY_H
#define FUSE_FSVERITY_H

#include <stdint.h>

/* FUSE_INIT: fuse_init_in.flags2 / fuse_init_out.flags2 bit (proposed). */
#define FUSE_FS_VERITY_INIT_BIT   48
#define FUSE_FS_VERITY            (1ULL << FUSE_FS_VERITY_INIT_BIT)

/* fuse_attr.flags: this inode has fs-verity enabled (proposed). */
#define FUSE_ATTR_FSVERITY        (1u << 2)

/* The opcode (proposed; outside the range the kernel has used so far). */
#define FUSE_FSVERITY             64

#define FUSE_FSVERITY_VERSION     1

/* fuse_fsverity_in.op */
enum fuse_fsverity_op {
	FUSE_FSVERITY_OP_GET_DESCRIPTOR   = 1, /* pread of the 256-byte descriptor */
	FUSE_FSVERITY_OP_READ_MERKLE_TREE = 2, /* pread of the tree, kernel layout */
	FUSE_FSVERITY_OP_READ_SIGNATURE   = 3, /* pread of the enable-time signature */
	FUSE_FSVERITY_OP_MEASURE          = 4, /* struct fsverity_digest */
	FUSE_FSVERITY_OP_ENABLE           = 5, /* build, commit; no payload back */
};

/* Largest payload a server returns for one read; larger requests are clamped. */
#define FUSE_FSVERITY_MAX_READ    (1u << 20)

/*
 * Request: the header below, then for ENABLE exactly `size` bytes of
 * struct fsverity_enable_arg (128 bytes) || salt || signature, which is what
 * the kernel forwards as FUSE_IOCTL(FS_IOC_ENABLE_VERITY) today.
 */
struct fuse_fsverity_in {
	uint32_t version;  /*  0: FUSE_FSVERITY_VERSION */
	uint32_t op;       /*  4: enum fuse_fsverity_op */
	uint64_t offset;   /*  8: READ_* and GET_DESCRIPTOR: byte offset; else 0 */
	uint32_t size;     /* 16: READ_*: max bytes; MEASURE: digest buffer bytes;
	                    *     ENABLE: bytes that follow this header */
	uint32_t flags;    /* 20: none defined: 0 */
};                         /* 24 bytes */

/* Reply: this header, then `size` payload bytes. */
struct fuse_fsverity_out {
	uint32_t size;     /*  0: payload bytes that follow */
	uint32_t flags;    /*  4: FUSE_FSVERITY_OUT_* */
	uint64_t total;    /*  8: READ_*, GET_DESCRIPTOR: size of the whole item */
};                         /* 16 bytes */

/* fuse_fsverity_out.flags: the payload reaches the end of the item. */
#define FUSE_FSVERITY_OUT_EOF     (1u << 0)

/* Compile-time layout checks (C11). */
_Static_assert(sizeof(struct fuse_fsverity_in) == 24, "fuse_fsverity_in is 24 bytes");
_Static_assert(sizeof(struct fuse_fsverity_out) == 16, "fuse_fsverity_out is 16 bytes");

#endif /* FUSE_FSVERITY_H */
