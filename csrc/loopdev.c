/* loopdev native shim: thin ioctl wrappers and the allocate-configure-retry
 * loop. Every struct and number comes from the kernel headers. Functions
 * return 0 (or a non-negative result) on success and -errno on failure; they
 * never touch errno-dependent Python state, so cffi can release the GIL. */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include <linux/blkpg.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <linux/major.h>

/* Fallbacks so the shim builds against headers older than the features; the
 * runtime decides whether the kernel has them. */
#ifndef LO_FLAGS_PARTSCAN
#define LO_FLAGS_PARTSCAN 8
#endif
#ifndef LO_FLAGS_DIRECT_IO
#define LO_FLAGS_DIRECT_IO 16
#endif
#ifndef LOOP_SET_DIRECT_IO
#define LOOP_SET_DIRECT_IO 0x4C08
#endif
#ifndef LOOP_SET_BLOCK_SIZE
#define LOOP_SET_BLOCK_SIZE 0x4C09
#endif
#ifndef LOOP_CONFIGURE
#define LOOP_CONFIGURE 0x4C0A
struct loop_config {
    __u32 fd;
    __u32 block_size;
    struct loop_info64 info;
    __u64 __reserved[8];
};
#endif
#ifndef BLKGETDISKSEQ
#define BLKGETDISKSEQ _IOR(0x12, 128, __u64)
#endif

enum ld_stage {
    LD_STAGE_NONE, LD_STAGE_CONTROL, LD_STAGE_GET_FREE, LD_STAGE_OPEN,
    LD_STAGE_CHECK, LD_STAGE_HOOK, LD_STAGE_LOCK, LD_STAGE_CONFIGURE,
    LD_STAGE_SET_FD, LD_STAGE_SET_STATUS, LD_STAGE_BLOCK_SIZE,
    LD_STAGE_DIRECT_IO, LD_STAGE_VERIFY, LD_STAGE_EXHAUSTED, LD_STAGE_PARTITIONS
};

struct ld_config {
    uint64_t offset;
    uint64_t sizelimit;
    uint32_t block_size;
    uint32_t flags;
    int direct_io;
    const char *file_name;      /* recorded in lo_file_name (cut at 63); may be NULL */
};

struct ld_attach_req {
    int ctl_fd;
    int dev_dirfd;
    int backing_fd;
    int lock;
    int max_attempts;
    int timeout_ms;
    struct ld_config config;
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
    uint64_t rdev;
    uint32_t mode;
};

/* -1 unknown, 0 absent, 1 present; decided once per process by trying. */
static int configure_state = -1;
static int force_fallback = 0;

static int neg_errno(void) { return errno ? -errno : -EIO; }

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

static unsigned jitter_seed(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned)ts.tv_nsec ^ ((unsigned)getpid() << 16) ^ (unsigned)(uintptr_t)&ts;
}

/* Contention backoff (as systemd does): a few immediate retries, then a
 * random sleep whose ceiling grows from 10 ms to 250 ms, so that competing
 * allocators stop meeting on the same minor. */
static void backoff(int attempt, unsigned *seed)
{
    long ceiling_us;
    if (attempt <= 2)
        return;
    ceiling_us = 10000L << (attempt - 3 > 5 ? 5 : attempt - 3);
    if (ceiling_us > 250000L)
        ceiling_us = 250000L;
    sleep_us(1000 + (long)(rand_r(seed) % ceiling_us));
}

int ld_ioctl(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? neg_errno() : r;
}

int ld_get_status(int fd, struct loop_info64 *info)
{
    return ioctl(fd, LOOP_GET_STATUS64, info) < 0 ? neg_errno() : 0;
}

/* Since 5.0 SET_STATUS64 and SET_BLOCK_SIZE answer EAGAIN while the page
 * cache of the device cannot be dropped (typically udev or another reader
 * has it open for a moment): retry, bounded, with short growing sleeps. */
static int ioctl_retry_eagain(int fd, unsigned long request, unsigned long arg)
{
    long delay_us = 200;
    for (int i = 0; i < 64; i++) {
        if (ioctl(fd, request, arg) == 0)
            return 0;
        if (errno != EAGAIN)
            return neg_errno();
        sleep_us(delay_us);
        if (delay_us < 20000)
            delay_us *= 2;
    }
    return -EAGAIN;
}

int ld_set_status(int fd, const struct loop_info64 *info)
{
    return ioctl_retry_eagain(fd, LOOP_SET_STATUS64, (unsigned long)info);
}

int ld_get_u64(int fd, unsigned long request, uint64_t *out)
{
    return ioctl(fd, request, out) < 0 ? neg_errno() : 0;
}

int ld_get_int(int fd, unsigned long request, int *out)
{
    return ioctl(fd, request, out) < 0 ? neg_errno() : 0;
}

void ld_force_fallback(int on)
{
    __atomic_store_n(&force_fallback, on, __ATOMIC_RELAXED);
}

/* LOOP_CONFIGURE (5.8+) copies its argument before anything else, so a NULL
 * argument answers EFAULT where it exists. Unknown loop ioctls answer EINVAL,
 * compat layers ENOTTY, qemu-user ENOSYS. Trying beats kernel versions. */
static int probe_configure(int dev_fd)
{
    int state = __atomic_load_n(&configure_state, __ATOMIC_RELAXED);
    if (state >= 0)
        return state;
    if (ioctl(dev_fd, LOOP_CONFIGURE, NULL) < 0 &&
        (errno == EINVAL || errno == ENOTTY || errno == ENOSYS))
        state = 0;
    else
        state = 1;
    __atomic_store_n(&configure_state, state, __ATOMIC_RELAXED);
    return state;
}

/* The kernel keeps whatever name it is given (losetup passes the path);
 * the full path is in sysfs, this copy is for LOOP_GET_STATUS64 readers. */
static void set_file_name(struct loop_info64 *info, const struct ld_config *c)
{
    if (c->file_name)
        strncpy((char *)info->lo_file_name, c->file_name, LO_NAME_SIZE - 1);
}

static int bind_configure(int dev_fd, int backing_fd, const struct ld_config *c, int *stage)
{
    struct loop_config lc;
    memset(&lc, 0, sizeof(lc));
    lc.fd = (uint32_t)backing_fd;
    lc.block_size = c->block_size;
    lc.info.lo_offset = c->offset;
    lc.info.lo_sizelimit = c->sizelimit;
    lc.info.lo_flags = c->flags & (LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR);
    /* Asking for direct I/O here costs nothing; LOOP_SET_DIRECT_IO later
     * freezes the queue (about 17 ms). The kernel falls back to buffered
     * I/O where the file refuses O_DIRECT; the step below and verify()
     * handle that. */
    if (c->direct_io)
        lc.info.lo_flags |= LO_FLAGS_DIRECT_IO;
    set_file_name(&lc.info, c);
    *stage = LD_STAGE_CONFIGURE;
    return ioctl(dev_fd, LOOP_CONFIGURE, &lc) < 0 ? neg_errno() : 0;
}

/* Old kernels: SET_FD, then SET_STATUS64, then SET_BLOCK_SIZE. SET_FD takes
 * read-only from the backing fd's mode (SET_STATUS64 cannot set it), so a
 * read-only device over a writable fd needs a read-only reopen. Returns
 * 1 when bound (the caller clears it on a later failure). */
static int bind_legacy(int dev_fd, int backing_fd, const struct ld_config *c, int *stage, int *bound)
{
    struct loop_info64 info;
    int bind_fd = backing_fd, r;

    if ((c->flags & LO_FLAGS_READ_ONLY) && (fcntl(backing_fd, F_GETFL) & O_ACCMODE) != O_RDONLY) {
        char path[64];
        snprintf(path, sizeof(path), "/proc/self/fd/%d", backing_fd);
        bind_fd = open(path, O_RDONLY | O_CLOEXEC);
        if (bind_fd < 0) {
            *stage = LD_STAGE_SET_FD;
            return neg_errno();
        }
    }
    *stage = LD_STAGE_SET_FD;
    r = ioctl(dev_fd, LOOP_SET_FD, (unsigned long)bind_fd) < 0 ? neg_errno() : 0;
    if (bind_fd != backing_fd)
        close(bind_fd);
    if (r < 0)
        return r;
    *bound = 1;

    memset(&info, 0, sizeof(info));
    info.lo_offset = c->offset;
    info.lo_sizelimit = c->sizelimit;
    info.lo_flags = c->flags & LO_FLAGS_AUTOCLEAR;
    set_file_name(&info, c);
    *stage = LD_STAGE_SET_STATUS;
    r = ld_set_status(dev_fd, &info);
    if (r < 0)
        return r;
    if (c->block_size) {
        *stage = LD_STAGE_BLOCK_SIZE;
        r = ioctl_retry_eagain(dev_fd, LOOP_SET_BLOCK_SIZE, c->block_size);
    }
    return r;
}

/* Read back what the kernel applied: vanilla 5.8 ignored sizelimit and
 * partscan in LOOP_CONFIGURE, and direct I/O can be refused silently. */
static int verify(int dev_fd, const struct ld_config *c)
{
    struct loop_info64 info;
    uint32_t want = c->flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN);
    if (ioctl(dev_fd, LOOP_GET_STATUS64, &info) < 0)
        return neg_errno();
    if (info.lo_offset != c->offset || info.lo_sizelimit != c->sizelimit)
        return -EINVAL;
    if ((info.lo_flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN)) != want)
        return -EINVAL;
    if ((c->flags & LO_FLAGS_READ_ONLY) && !(info.lo_flags & LO_FLAGS_READ_ONLY))
        return -EINVAL;
    if (c->direct_io == 2 && !(info.lo_flags & LO_FLAGS_DIRECT_IO))
        return -EINVAL;
    if (c->block_size) {
        int bs = 0;
        if (ioctl(dev_fd, BLKSSZGET, &bs) < 0)
            return neg_errno();
        if ((uint32_t)bs != c->block_size)
            return -EINVAL;
    }
    return 0;
}

int ld_configure(int dev_fd, int backing_fd, const struct ld_config *c, int *stage)
{
    int bound = 0, r;
    int legacy = __atomic_load_n(&force_fallback, __ATOMIC_RELAXED) || !probe_configure(dev_fd);

    if (legacy) {
        r = bind_legacy(dev_fd, backing_fd, c, stage, &bound);
    } else {
        r = bind_configure(dev_fd, backing_fd, c, stage);
        bound = r == 0;
    }
    /* Partscan goes on only after the device is configured: configuring with
     * it at once sends a change event before the scan, and a prober opening
     * the device then triggers a second scan that drops and re-adds every
     * partition (systemd PR #41425). Passing the full flags again also
     * survives kernels that cleared PARTSCAN on every SET_STATUS64. */
    if (r == 0 && (c->flags & LO_FLAGS_PARTSCAN)) {
        struct loop_info64 info;
        *stage = LD_STAGE_SET_STATUS;
        r = ld_get_status(dev_fd, &info);
        if (r == 0) {
            info.lo_flags = (info.lo_flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN)) |
                            LO_FLAGS_PARTSCAN;
            r = ld_set_status(dev_fd, &info);
        }
    }
    if (r == 0 && c->direct_io) {
        struct loop_info64 info;
        *stage = LD_STAGE_DIRECT_IO;
        r = ld_get_status(dev_fd, &info);
        if (r == 0 && !(info.lo_flags & LO_FLAGS_DIRECT_IO))
            r = ioctl(dev_fd, LOOP_SET_DIRECT_IO, 1UL) < 0 ? neg_errno() : 0;
        if (r < 0 && c->direct_io == 1)
            r = 0; /* "try": a backing file without O_DIRECT keeps buffered I/O */
    }
    if (r == 0) {
        *stage = LD_STAGE_VERIFY;
        r = verify(dev_fd, c);
    }
    if (r < 0 && bound) {
        /* Never leave a half-configured device behind (libblockdev #1170).
         * Since 6.x CLR_FD only marks autoclear; the unbind happens when the
         * last opener, normally our caller, closes the device. */
        int saved = r;
        ioctl(dev_fd, LOOP_CLR_FD, 0);
        r = saved;
    }
    if (r == 0)
        *stage = LD_STAGE_NONE;
    return r;
}

int ld_blkpg(int dev_fd, int op, int pno, long long start, long long length);

/* Partitions added with BLKPG to a device without partscan survive
 * LOOP_CLR_FD and come back when the minor is bound to another file, now
 * pointing into it (measured on 6.18). Delete every partition sysfs lists.
 * Returns how many were deleted, or -errno (EBUSY: one is still open). */
/* A partition is a subdirectory of /sys/block/loopN, so the directory's link
 * count grows with each one. The count of an unbound device without
 * partitions is learnt from a full scan that found none; later a stat tells
 * whether a scan is needed at all (it costs a third of an attach). */
static nlink_t bare_unbound_nlink = 0;

struct part_span {
    int pno;
    long long start, length; /* bytes */
};

static long long sysfs_sectors(const char *dir, const char *name, const char *attr)
{
    char path[160];
    long long value = -1;
    FILE *f;
    snprintf(path, sizeof(path), "%s/%s/%s", dir, name, attr);
    f = fopen(path, "re");
    if (!f)
        return -1;
    if (fscanf(f, "%lld", &value) != 1)
        value = -1;
    fclose(f);
    return value < 0 ? -1 : value * 512;
}

/* Delete every partition, or none: BLKPG refuses one that is open (EBUSY),
 * and the ones deleted before it are added back, so a busy device is left
 * as it was. Returns how many were deleted, or -errno. */
int ld_del_partitions(int dev_fd, int minor, int unbound)
{
    char path[64], prefix[32];
    struct part_span parts[256];
    struct dirent *e;
    struct stat st;
    size_t plen;
    int n = 0, deleted = 0, err = 0;
    nlink_t bare = __atomic_load_n(&bare_unbound_nlink, __ATOMIC_RELAXED);
    DIR *d;

    snprintf(path, sizeof(path), "/sys/block/loop%d", minor);
    plen = (size_t)snprintf(prefix, sizeof(prefix), "loop%dp", minor);
    if (stat(path, &st) < 0)
        return errno == ENOENT ? 0 : neg_errno();
    if (unbound && bare && st.st_nlink <= bare)
        return 0;
    d = opendir(path);
    if (!d)
        return errno == ENOENT ? 0 : neg_errno();
    while ((e = readdir(d)) != NULL && n < 256) {
        char *end;
        long pno;
        if (strncmp(e->d_name, prefix, plen) != 0)
            continue;
        pno = strtol(e->d_name + plen, &end, 10);
        if (*end || pno <= 0)
            continue;
        parts[n].pno = (int)pno;
        parts[n].start = sysfs_sectors(path, e->d_name, "start");
        parts[n].length = sysfs_sectors(path, e->d_name, "size");
        n++;
    }
    closedir(d);
    if (unbound && n == 0)
        __atomic_store_n(&bare_unbound_nlink, st.st_nlink, __ATOMIC_RELAXED);
    for (int i = 0; i < n; i++) {
        int r = ld_blkpg(dev_fd, BLKPG_DEL_PARTITION, parts[i].pno, 0, 0);
        if (r == 0 || r == -ENXIO) {
            parts[deleted++] = parts[i]; /* compact: the first `deleted` are gone */
            continue;
        }
        err = r;
        break;
    }
    if (err) {
        for (int i = 0; i < deleted; i++)
            if (parts[i].start >= 0 && parts[i].length > 0)
                ld_blkpg(dev_fd, BLKPG_ADD_PARTITION, parts[i].pno, parts[i].start,
                         parts[i].length);
        return err;
    }
    return deleted;
}

static int is_loop_node(int fd, int minor, struct ld_attach_res *res)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return neg_errno();
    if (S_ISBLK(st.st_mode) && major(st.st_rdev) == LOOP_MAJOR && (int)minor(st.st_rdev) == minor)
        return 0;
    res->rdev = st.st_rdev;
    res->mode = st.st_mode;
    return -ENODEV;
}

static void discard(const struct ld_attach_req *req, int fd)
{
    if (req->on_open)
        req->on_discard(req->ctx, fd);
    else
        close(fd);
}

/* One ld_attach call's state: its deadline, and the minors it gave up on for
 * a reason that outlasts a retry (another process holds the device locked,
 * or a stale partition of it open). */
struct skip_list {
    int64_t deadline;
    int n;
    int minors[64];
};

static int skipped(const struct skip_list *skip, int minor)
{
    for (int i = 0; i < skip->n; i++)
        if (skip->minors[i] == minor)
            return 1;
    return 0;
}

static void skip_minor(struct skip_list *skip, int minor)
{
    if (skip->n < (int)(sizeof(skip->minors) / sizeof(skip->minors[0])))
        skip->minors[skip->n++] = minor;
}

/* flock on loop-control excludes other processes, but not threads sharing
 * one open file (nor children forked with it): a process-wide mutex covers
 * those. The child of a fork gets the mutex back unlocked. */
static pthread_mutex_t alloc_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void reset_mutex_in_child(void)
{
    pthread_mutex_init(&alloc_mutex, NULL);
}

static void register_atfork(void)
{
    pthread_atfork(NULL, NULL, reset_mutex_in_child);
}

/* Non-blocking tries until the deadline: a holder that hangs (a stopped
 * process) must not make us outlive our own bound. */
static int lock_control(int ctl_fd, int64_t deadline)
{
    long delay_us = 50;
    pthread_once(&atfork_once, register_atfork);
    while (pthread_mutex_trylock(&alloc_mutex) != 0) {
        if (now_ms() > deadline)
            return -ETIMEDOUT;
        sleep_us(delay_us);
        delay_us = delay_us < 500 ? delay_us * 2 : 500;
    }
    while (flock(ctl_fd, LOCK_EX | LOCK_NB) < 0) {
        /* EINTR: Python's signal handlers are installed without SA_RESTART. */
        if ((errno != EWOULDBLOCK && errno != EINTR) || now_ms() > deadline) {
            int err = errno == EWOULDBLOCK ? -ETIMEDOUT : neg_errno();
            pthread_mutex_unlock(&alloc_mutex);
            return err;
        }
        sleep_us(delay_us);
        delay_us = delay_us < 500 ? delay_us * 2 : 500;
    }
    return 0;
}

static void unlock_control(int ctl_fd)
{
    flock(ctl_fd, LOCK_UN);
    pthread_mutex_unlock(&alloc_mutex);
}

/* One attempt's outcome: 0 done, 1 transient (try another round), <0 fatal. */
static int attempt_once(const struct ld_attach_req *req, struct ld_attach_res *res,
                        struct skip_list *skip)
{
    char name[32];
    int minor, fd, r, stage;

    /* Serialise with cooperating allocators (systemd does the same): between
     * GET_FREE and CONFIGURE another of them would pick the same minor. Lock
     * order: control first, device second. */
    r = lock_control(req->ctl_fd, skip->deadline);
    if (r < 0) {
        res->err = r == -ETIMEDOUT ? -EBUSY : r;
        res->stage = r == -ETIMEDOUT ? LD_STAGE_EXHAUSTED : LD_STAGE_CONTROL;
        return res->err;
    }
    minor = ioctl(req->ctl_fd, LOOP_CTL_GET_FREE);
    /* GET_FREE names the lowest unbound minor again and again, so a device
     * we must skip would be offered until the retries run out: ask for a
     * new device instead. */
    if (minor >= 0 && skipped(skip, minor))
        minor = ioctl(req->ctl_fd, LOOP_CTL_ADD, -1);
    if (minor < 0) {
        res->err = neg_errno();
        res->stage = LD_STAGE_GET_FREE;
        unlock_control(req->ctl_fd);
        return res->err;
    }
    res->minor = minor;
    snprintf(name, sizeof(name), "loop%d", minor);
    fd = openat(req->dev_dirfd, name, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        res->err = neg_errno();
        res->stage = LD_STAGE_OPEN;
        unlock_control(req->ctl_fd);
        /* Since 6.x opening a device in autoclear rundown, or one being
         * removed, answers ENXIO (ENOENT once the node is gone): another
         * process released it right after GET_FREE named it. */
        return (res->err == -ENXIO || res->err == -ENOENT) ? 1 : res->err;
    }
    r = is_loop_node(fd, minor, res);
    if (r < 0) {
        close(fd);
        unlock_control(req->ctl_fd);
        res->err = r;
        res->stage = LD_STAGE_CHECK;
        return r;
    }
    if (req->on_open) {
        /* The hook runs Python code of the caller's: do not hold the control
         * lock across it (it may allocate devices itself). */
        unlock_control(req->ctl_fd);
        if (req->on_open(req->ctx, minor, fd) != 0) {
            res->err = -ECANCELED;
            res->stage = LD_STAGE_HOOK;
            return res->err; /* the hook has closed the device */
        }
        r = lock_control(req->ctl_fd, skip->deadline);
        if (r < 0) {
            discard(req, fd);
            res->err = r == -ETIMEDOUT ? -EBUSY : r;
            res->stage = r == -ETIMEDOUT ? LD_STAGE_EXHAUSTED : LD_STAGE_CONTROL;
            return res->err;
        }
    }
    if (req->lock && flock(fd, LOCK_EX | LOCK_NB) < 0) {
        res->err = neg_errno();
        res->stage = LD_STAGE_LOCK;
        discard(req, fd);
        unlock_control(req->ctl_fd);
        if (res->err != -EWOULDBLOCK)
            return res->err;
        skip_minor(skip, minor);
        return 1;
    }
    r = ld_del_partitions(fd, minor, 1);
    if (r < 0) {
        res->err = r;
        res->stage = LD_STAGE_PARTITIONS;
        discard(req, fd);
        unlock_control(req->ctl_fd);
        if (r != -EBUSY)
            return r;
        skip_minor(skip, minor); /* a stale partition is open: use another device */
        return 1;
    }
    r = ld_configure(fd, req->backing_fd, &req->config, &stage);
    unlock_control(req->ctl_fd);
    if (r == 0) {
        res->fd = fd;
        res->err = 0;
        res->stage = LD_STAGE_NONE;
        return 0;
    }
    discard(req, fd);
    res->err = r;
    res->stage = stage;
    /* EBUSY before anything was bound: another process bound this minor
     * since GET_FREE, or pages of its previous file are still being released
     * (osbuild #177). Both pass; another round picks a free device. */
    if (r == -EBUSY && (stage == LD_STAGE_CONFIGURE || stage == LD_STAGE_SET_FD))
        return 1;
    return r;
}

int ld_attach(const struct ld_attach_req *req, struct ld_attach_res *res)
{
    int64_t deadline = now_ms() + (req->timeout_ms > 0 ? req->timeout_ms : 30000);
    int attempts = req->max_attempts > 0 ? req->max_attempts : 64;
    unsigned seed = jitter_seed();
    struct skip_list skip = { deadline, 0, { 0 } };

    memset(res, 0, sizeof(*res));
    res->fd = -1;
    res->minor = -1;
    for (int attempt = 0; attempt < attempts; attempt++) {
        int r;
        if (attempt > 0) {
            res->retries++;
            backoff(attempt, &seed);
            if (now_ms() > deadline)
                break;
        }
        r = attempt_once(req, res, &skip);
        if (r <= 0)
            return r;
    }
    /* res->err and res->stage keep the last transient failure. */
    res->fd = -1;
    res->stage = LD_STAGE_EXHAUSTED;
    return res->err ? res->err : -EBUSY;
}

int ld_blkpg(int dev_fd, int op, int pno, long long start, long long length)
{
    struct blkpg_partition part;
    struct blkpg_ioctl_arg arg;
    memset(&part, 0, sizeof(part));
    part.start = start;
    part.length = length;
    part.pno = pno;
    memset(&arg, 0, sizeof(arg));
    arg.op = op;
    arg.datalen = sizeof(part);
    arg.data = &part;
    return ioctl(dev_fd, BLKPG, &arg) < 0 ? neg_errno() : 0;
}
