/* The shim's own types and functions, written once: loopdev.c includes this
 * file and build_ffi.py hands it to cffi as part of the cdef, so it holds
 * plain declarations only (no preprocessor lines). Every function returns
 * 0 (or a non-negative result) on success and -errno on failure. */

/* Where a failed call stopped: lets Python name the step in its error. */
enum ld_stage {
    LD_STAGE_NONE,
    LD_STAGE_GET_FREE,      /* LOOP_CTL_GET_FREE or LOOP_CTL_ADD */
    LD_STAGE_OPEN,          /* opening loopN in the device directory */
    LD_STAGE_NODE,          /* making a private node where the directory has none */
    LD_STAGE_CHECK,         /* the node found is not block device loopN */
    LD_STAGE_HOOK,          /* the caller's on_open hook raised */
    LD_STAGE_LOCK,          /* flock on the device */
    LD_STAGE_PARTITIONS,    /* deleting partitions an earlier binding left */
    LD_STAGE_CONFIGURE,     /* LOOP_CONFIGURE */
    LD_STAGE_SET_FD,        /* LOOP_SET_FD (fallback) */
    LD_STAGE_SET_STATUS,    /* LOOP_SET_STATUS64 */
    LD_STAGE_BLOCK_SIZE,    /* LOOP_SET_BLOCK_SIZE (fallback) */
    LD_STAGE_DIRECT_IO,     /* LOOP_SET_DIRECT_IO */
    LD_STAGE_VERIFY,        /* reading back what the kernel applied */
    LD_STAGE_INTERRUPTED    /* a signal arrived while waiting; nothing is bound */
};

/* direct_io: 0 leave off, 1 try (ignore refusal), 2 required. */
struct ld_config {
    uint64_t offset;
    uint64_t sizelimit;
    uint32_t block_size;
    uint32_t flags;             /* LO_FLAGS_READ_ONLY | AUTOCLEAR | PARTSCAN */
    int direct_io;
    const char *file_name;      /* for lo_file_name; NULL: the backing fd's path */
};

struct ld_attach_req {
    int ctl_fd;                 /* open loop-control */
    int dev_dirfd;              /* directory holding the loopN nodes */
    int private_nodes;          /* 1: reach loopN through a private node where
                                   dev_dirfd has none (or a wrong one) */
    int part_shift;             /* minor of loopN = N << part_shift */
    int backing_fd;
    int lock;                   /* exclusive non-blocking flock on the device */
    int max_attempts;
    int timeout_ms;
    int resume;                 /* 1: called again after LD_STAGE_INTERRUPTED:
                                   signals blocked from the start, no return
                                   before the first nap (see loopdev.c) */
    struct ld_config config;
    /* Optional hooks; when on_open is set the hooks own each device fd it
     * took (0), or closed when it failed (-1); any other answer: it never
     * took the fd. on_discard answers nonzero when it raised: the attach
     * stops (LD_STAGE_HOOK). */
    int (*on_open)(void *ctx, int index, int fd);
    int (*on_discard)(void *ctx, int fd);
    void *ctx;
};

struct ld_attach_res {
    int index;                  /* N of loopN, -1 before GET_FREE answered */
    int fd;
    int err;
    int stage;
    int retries;
    int exhausted;              /* retries or time ran out; err and stage are
                                   the last race seen */
    uint64_t rdev;              /* LD_STAGE_CHECK: what the node really is */
    uint32_t mode;
};

int ld_ioctl(int fd, unsigned long request, unsigned long arg);
int ld_get_status(int fd, struct loop_info64 *info);
int ld_set_status(int fd, const struct loop_info64 *info);
int ld_get_u64(int fd, unsigned long request, uint64_t *out);
int64_t ld_diskseq(int fd);
int ld_get_int(int fd, unsigned long request, int *out);
int ld_bind(int dev_fd, int index, int backing_fd, const struct ld_config *config, int *stage);
int ld_attach(const struct ld_attach_req *req, struct ld_attach_res *res);
/* The compat cycle's fast paths: scalars in, a scalar out (see loopdev.c). */
int64_t ld_attach_plain(const struct ld_attach_req *base, int backing_fd, uint32_t flags,
                        uint64_t offset, uint64_t sizelimit, uint32_t block_size, int lock,
                        int direct_io, const char *file_name, long token);
/* ld_attach_plain without offset, size limit, block size or lock (the common case:
 * four arguments fewer to convert). */
int64_t ld_attach_flags(const struct ld_attach_req *base, int backing_fd, uint32_t flags,
                        long token);
void ld_last_res(struct ld_attach_res *out);
int ld_claim(long token);
int ld_last_stage(void);
int ld_release(int dev_fd, int index, int bound);
int ld_blkpg(int dev_fd, int op, int pno, long long start, long long length);
/* bound: 1 known bound, -1 unknown (asked only where the link count leaves a doubt). */
int ld_del_partitions(int dev_fd, int index, int bound);
/* The device's dirty pages into the backing file, waited for (errors as fsync). */
int ld_write_back(int fd);
void ld_force_fallback(int on);
/* Process-wide set-up: the cached handle on sysfs's block directory, the CRC table. */
void ld_init(void);
/* CRC-32 of a GPT header or entry array (zlib's crc32(0, data, len)). */
uint32_t ld_crc32(const char *data, size_t len);
/* loopN through a node of our own in a fresh directory below dirfd, unlinked
 * before returning the fd; oflags: O_RDONLY or O_RDWR. */
int ld_open_private(int dirfd, int index, int part_shift, int oflags);
/* 0 when fd is block device loopN (7:(N << part_shift)); else -ENODEV with
 * what it is in res->rdev and res->mode (or fstat's -errno). */
int ld_check_node(int fd, int index, int part_shift, struct ld_attach_res *res);
/* loopN below dirfd opened (oflags: O_RDONLY or O_RDWR) and checked to be block
 * device 7:(N << part_shift); with private_nodes a missing or wrong node is
 * passed by through ld_open_private. The fd, or -errno with res->stage
 * (LD_STAGE_OPEN, _CHECK or _NODE) and, for a wrong node, its rdev and mode.
 * The attach loop opens each device so. */
int ld_open_device(int dirfd, int index, int part_shift, int private_nodes, int oflags,
                   struct ld_attach_res *res);
int ld_bind_mount(const char *source, const char *target);
int ld_unmount(const char *target);

/* What sysfs says of a bound loop device (/sys/block/NAME/...), read in one
 * call: the ioctl cuts the backing path at 64 bytes, sysfs does not. */
struct ld_sysfs_info {
    uint64_t offset;
    uint64_t sizelimit;
    uint64_t sectors;           /* size in 512-byte sectors */
    int read_only;
    int autoclear;
    int partscan;
    int direct_io;
    int block_size;
    int backing_len;
    char backing[4096];
};

int ld_sysfs_info(const char *name, struct ld_sysfs_info *out);
