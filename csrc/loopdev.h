/* The cdef: only what Python calls. Layouts and numbers are completed by the
 * C compiler from the kernel headers (`...`), never written here by hand. */

#define LO_NAME_SIZE ...
#define LO_KEY_SIZE ...
#define LOOP_MAJOR ...

#define LO_FLAGS_READ_ONLY ...
#define LO_FLAGS_AUTOCLEAR ...
#define LO_FLAGS_PARTSCAN ...
#define LO_FLAGS_DIRECT_IO ...

#define LOOP_SET_FD ...
#define LOOP_CLR_FD ...
#define LOOP_SET_STATUS64 ...
#define LOOP_GET_STATUS64 ...
#define LOOP_CHANGE_FD ...
#define LOOP_SET_CAPACITY ...
#define LOOP_SET_DIRECT_IO ...
#define LOOP_SET_BLOCK_SIZE ...
#define LOOP_CONFIGURE ...
#define LOOP_CTL_ADD ...
#define LOOP_CTL_REMOVE ...
#define LOOP_CTL_GET_FREE ...

#define BLKFLSBUF ...
#define BLKSSZGET ...
#define BLKGETSIZE64 ...
#define BLKGETDISKSEQ ...
#define BLKPG ...
#define BLKPG_ADD_PARTITION ...
#define BLKPG_DEL_PARTITION ...

struct loop_info64 {
    unsigned long long lo_device;
    unsigned long long lo_inode;
    unsigned long long lo_rdevice;
    unsigned long long lo_offset;
    unsigned long long lo_sizelimit;
    unsigned int lo_number;
    unsigned int lo_encrypt_type;
    unsigned int lo_encrypt_key_size;
    unsigned int lo_flags;
    unsigned char lo_file_name[...];
    unsigned char lo_crypt_name[...];
    unsigned char lo_encrypt_key[...];
    unsigned long long lo_init[...];
    ...;
};

struct loop_config {
    unsigned int fd;
    unsigned int block_size;
    struct loop_info64 info;
    ...;
};

struct blkpg_partition {
    long long start;
    long long length;
    int pno;
    ...;
};

/* Where a failed call stopped: lets Python name the step in its error. */
enum ld_stage {
    LD_STAGE_NONE, LD_STAGE_CONTROL, LD_STAGE_GET_FREE, LD_STAGE_OPEN,
    LD_STAGE_CHECK, LD_STAGE_HOOK, LD_STAGE_LOCK, LD_STAGE_CONFIGURE,
    LD_STAGE_SET_FD, LD_STAGE_SET_STATUS, LD_STAGE_BLOCK_SIZE,
    LD_STAGE_DIRECT_IO, LD_STAGE_VERIFY, LD_STAGE_EXHAUSTED, LD_STAGE_PARTITIONS
};

/* direct_io: 0 leave off, 1 try (ignore refusal), 2 required. */
struct ld_config {
    uint64_t offset;
    uint64_t sizelimit;
    uint32_t block_size;
    uint32_t flags;
    int direct_io;
    const char *file_name;      /* recorded in lo_file_name (cut at 63); may be NULL */
};

struct ld_attach_req {
    int ctl_fd;                 /* open loop-control */
    int dev_dirfd;              /* directory holding the loopN nodes */
    int backing_fd;
    int lock;                   /* exclusive non-blocking flock on the device */
    int max_attempts;
    int timeout_ms;
    struct ld_config config;
    /* Optional hooks; when on_open is set the hooks own the device fd. */
    int (*on_open)(void *ctx, int minor, int fd);
    void (*on_discard)(void *ctx, int fd);
    void *ctx;
};

struct ld_attach_res {
    int minor;
    int fd;
    int err;
    int stage;
    int retries;
    uint64_t rdev;              /* LD_STAGE_CHECK: what the node really is */
    uint32_t mode;
};

extern "Python" int ld_py_on_open(void *ctx, int minor, int fd);
extern "Python" void ld_py_on_discard(void *ctx, int fd);

int ld_ioctl(int fd, unsigned long request, unsigned long arg);
int ld_get_status(int fd, struct loop_info64 *info);
int ld_set_status(int fd, const struct loop_info64 *info);
int ld_get_u64(int fd, unsigned long request, uint64_t *out);
int ld_get_int(int fd, unsigned long request, int *out);
int ld_configure(int dev_fd, int backing_fd, const struct ld_config *config, int *stage);
int ld_attach(const struct ld_attach_req *req, struct ld_attach_res *res);
int ld_blkpg(int dev_fd, int op, int pno, long long start, long long length);
int ld_del_partitions(int dev_fd, int minor, int unbound);
void ld_force_fallback(int on);
