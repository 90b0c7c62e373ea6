/* loopdev native shim: thin ioctl wrappers and the allocate-configure-retry
 * loop. Every kernel struct and number comes from the kernel headers, the
 * shim's own types from shim.h. Functions return 0 (or a non-negative
 * result) on success and -errno on failure; they never touch Python state,
 * so cffi releases the GIL around them. */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
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
#define LO_FLAGS_PARTSCAN 8            /* 3.2 */
#endif
#ifndef LO_FLAGS_DIRECT_IO
#define LO_FLAGS_DIRECT_IO 16          /* 4.4 */
#endif
#ifndef LOOP_SET_DIRECT_IO
#define LOOP_SET_DIRECT_IO 0x4C08      /* 4.4 */
#endif
#ifndef LOOP_SET_BLOCK_SIZE
#define LOOP_SET_BLOCK_SIZE 0x4C09     /* 4.14 */
#endif
#ifndef LOOP_CONFIGURE
#define LOOP_CONFIGURE 0x4C0A          /* 5.8 */
struct loop_config {
    __u32 fd;
    __u32 block_size;
    struct loop_info64 info;
    __u64 __reserved[8];
};
#endif
#ifndef BLKGETDISKSEQ
#define BLKGETDISKSEQ _IOR(0x12, 128, __u64) /* 5.15 */
#endif

#include "shim.h"

/* -1 unknown, 0 absent, 1 present; decided once per process by trying. */
static int configure_state = -1;
static int force_fallback = 0;


static int neg_errno(void) { return errno ? -errno : -EIO; }

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* The caller's signal mask while ld_attach naps. From the first nap on,
 * signals are blocked and let in only while sleeping, atomically (ppoll), so
 * one that comes between two naps is not lost: Ctrl-C ends the wait, and the
 * caller returns to Python, which runs the handler. The uncontended path
 * sleeps never and pays no mask changes. A signal that came before the mask
 * was set went to Python's own handler, which only notes it (the shim cannot
 * see that): so a call returns to the caller before its first nap, as if
 * interrupted, and the caller, having run the handlers, calls again with
 * resume set, which blocks signals from the start. */
struct sigwait {
    int blocked;
    sigset_t mask;
};

static void block(struct sigwait *sw)
{
    if (!sw->blocked) {
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, &sw->mask);
        sw->blocked = 1;
    }
}

static int nap_us(long us, struct sigwait *sw)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    block(sw);
    return ppoll(NULL, 0, &ts, &sw->mask) < 0 && errno == EINTR ? -EINTR : 0;
}

static void unblock(struct sigwait *sw)
{
    if (sw->blocked)
        pthread_sigmask(SIG_SETMASK, &sw->mask, NULL);
    sw->blocked = 0;
}

/* A sleep that must complete (nothing may be left half done). */
static void sleep_us(long us)
{
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

/* Different per call and per thread (the stack address), with no system call. */
static unsigned jitter_seed(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned)ts.tv_nsec ^ (unsigned)((uintptr_t)&ts >> 4);
}

/* prefix followed by the decimal n into buf (at least 32 bytes): the
 * names of the hot path ("loopN", "/proc/self/fd/N"). snprintf costs about
 * 700 instructions a call, and the compat cycle made four (issue 17). */
static char *name_n(char *buf, const char *prefix, int n)
{
    char digits[12];
    int len = 0;
    char *p = buf;
    unsigned u = n < 0 ? 0u - (unsigned)n : (unsigned)n;
    while (*prefix)
        *p++ = *prefix++;
    if (n < 0)
        *p++ = '-';
    do {
        digits[len++] = (char)('0' + u % 10);
        u /= 10;
    } while (u > 0);
    while (len > 0)
        *p++ = digits[--len];
    *p = 0;
    return buf;
}

/* ---------------------------------------------------------------- ioctls */

int ld_ioctl(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? neg_errno() : r;
}

int ld_get_status(int fd, struct loop_info64 *info)
{
    return ioctl(fd, LOOP_GET_STATUS64, info) < 0 ? neg_errno() : 0;
}

/* Since 5.0 (commit 5db470e229e2, "loop: drop caches if offset or block_size
 * are changed") SET_STATUS64 and SET_BLOCK_SIZE answer EAGAIN while
 * the page cache of the device cannot be dropped, typically because udev or
 * another reader has it open for a moment: retry, bounded, with short
 * growing sleeps (libblockdev PR #590, rauc PR #928). */
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

/* BLKGETDISKSEQ as a scalar, or -errno: attach() asks it of every device it
 * binds, and an out-pointer filled through cffi cost more than the ioctl. */
int64_t ld_diskseq(int fd)
{
    uint64_t seq;
    return ioctl(fd, BLKGETDISKSEQ, &seq) < 0 ? neg_errno() : (int64_t)seq;
}

int ld_get_int(int fd, unsigned long request, int *out)
{
    return ioctl(fd, request, out) < 0 ? neg_errno() : 0;
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

/* What was written through the device, written on into the backing file
 * and waited for: sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER) over
 * the whole device. Its wait reports write-back errors as fsync does (the
 * file's errseq, file_fdatawait_range() in mm/filemap.c, since 4.13). fsync
 * adds a cache flush of the device, which the loop driver turns into an
 * fsync of the backing file (lo_req_flush): durability of that file, which
 * neither losetup -d nor the kernel's own release gives, at 130-160 us of
 * the ~270 us of an attach()+detach() here against 1 us (issue 17). */
int ld_write_back(int fd)
{
    unsigned flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                     SYNC_FILE_RANGE_WAIT_AFTER;
    return sync_file_range(fd, 0, 0, flags) < 0 ? neg_errno() : 0;
}

void ld_force_fallback(int on)
{
    __atomic_store_n(&force_fallback, on, __ATOMIC_RELAXED);
}

/* ------------------------------------------------------- stale partitions */

/* Loop devices live below /sys/devices/virtual/block; a handle on that
 * directory, opened once, makes each look-up one path component instead of
 * the seven of /sys/block/loopN (a symlink). -1: sysfs unavailable. */
static int sysfs_block_fd(void)
{
    static int fd = -2;
    int cur = __atomic_load_n(&fd, __ATOMIC_ACQUIRE);
    if (cur == -2) {
        int mine = open("/sys/devices/virtual/block", O_PATH | O_DIRECTORY | O_CLOEXEC);
        int expected = -2;
        if (!__atomic_compare_exchange_n(&fd, &expected, mine, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE)) {
            if (mine >= 0)
                close(mine);
        }
        cur = __atomic_load_n(&fd, __ATOMIC_ACQUIRE);
    }
    return cur;
}

static void crc32_init(void);

/* Opened at import (loopdev._native), so that the descriptor is there from
 * the start and not a surprise to code counting its open fds later. */
void ld_init(void)
{
    sysfs_block_fd();
    crc32_init();
}

struct part_span {
    int pno;
    long long start, length; /* bytes; -1 unknown */
};

static long long sysfs_bytes(int dirfd, const char *part, const char *attr)
{
    char path[96], buf[32];
    long long sectors;
    ssize_t n;
    int fd;
    snprintf(path, sizeof(path), "%s/%s", part, attr);
    fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    sectors = strtoll(buf, NULL, 10);
    return sectors < 0 ? -1 : sectors * 512; /* sysfs counts 512-byte sectors */
}

/* The partitions sysfs lists for loopN, at most `max`; -errno on failure. */
static int list_partitions(int dev_dirfd, int index, struct part_span *parts, int max)
{
    char prefix[32];
    size_t plen = (size_t)snprintf(prefix, sizeof(prefix), "loop%dp", index);
    int n = 0, fd = dup(dev_dirfd);
    struct dirent *e;
    DIR *d;

    if (fd < 0)
        return neg_errno();
    d = fdopendir(fd);
    if (!d) {
        close(fd);
        return neg_errno();
    }
    while ((e = readdir(d)) != NULL && n < max) {
        char *end;
        long pno;
        if (strncmp(e->d_name, prefix, plen) != 0)
            continue;
        pno = strtol(e->d_name + plen, &end, 10);
        if (*end || pno <= 0)
            continue;
        parts[n].pno = (int)pno;
        parts[n].start = sysfs_bytes(dev_dirfd, e->d_name, "start");
        parts[n].length = sysfs_bytes(dev_dirfd, e->d_name, "size");
        n++;
    }
    closedir(d);
    return n;
}

/* A partition is a subdirectory of the device's sysfs directory, so its link
 * count grows with each one. The count without partitions is learnt from
 * full scans, separately for a bound device (it has a loop/ subdirectory)
 * and an unbound one; afterwards one stat tells whether a scan is needed at
 * all (a scan costs a third of an attach). The smallest count seen wins: a
 * state that changed under a scan can only make later checks scan more. */
static nlink_t bare_nlink[2];

static void learn_bare_nlink(int bound, nlink_t nlink)
{
    nlink_t cur = __atomic_load_n(&bare_nlink[bound], __ATOMIC_RELAXED);
    if (cur == 0 || nlink < cur)
        __atomic_store_n(&bare_nlink[bound], nlink, __ATOMIC_RELAXED);
}

/* The link count of loopN's sysfs directory: 0, 1 when there is none to
 * look at (no sysfs, no such device: nothing to delete), or -errno. */
static int link_count(int index, nlink_t *nlink)
{
    char name[32];
    struct stat st;
    int sysfs = sysfs_block_fd();

    if (sysfs < 0)
        return 1;
    name_n(name, "loop", index);
    if (fstatat(sysfs, name, &st, 0) < 0)
        return errno == ENOENT ? 1 : neg_errno();
    *nlink = st.st_nlink;
    return 0;
}

/* Whether a device in state `bound` with `nlink` links certainly has no
 * partitions. At or under the count of a bare unbound device there are none
 * whatever the state (binding only adds the loop/ directory), so one stat
 * answers for an unbound device, and for a bound one whose state the caller
 * knows, without asking the kernel. */
static int surely_bare(nlink_t nlink, int bound)
{
    nlink_t bare = __atomic_load_n(&bare_nlink[bound], __ATOMIC_RELAXED);
    return bare && nlink <= bare;
}

/* Delete every partition of loopN, or none: BLKPG refuses one that is open
 * (EBUSY), and the ones deleted before it are added back, so a busy device
 * is left as it was. Partitions added with BLKPG to a device without
 * partscan survive LOOP_CLR_FD and come back when the minor is bound to
 * another file, now pointing into it (measured on 6.18). Returns how many
 * were deleted, or -errno. */
static int del_partitions(int dev_fd, int index, int bound, nlink_t nlink)
{
    struct part_span parts[256];
    char name[32];
    int n, deleted = 0, r = 0, dirfd;

    name_n(name, "loop", index);
    dirfd = openat(sysfs_block_fd(), name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return errno == ENOENT ? 0 : neg_errno();
    n = list_partitions(dirfd, index, parts, 256);
    close(dirfd);
    if (n < 0)
        return n;
    learn_bare_nlink(bound, nlink - (nlink_t)n);
    for (int i = 0; i < n && r == 0; i++) {
        r = ld_blkpg(dev_fd, BLKPG_DEL_PARTITION, parts[i].pno, 0, 0);
        if (r == -ENXIO)
            r = 0; /* deleted by someone else meanwhile */
        if (r == 0)
            parts[deleted++] = parts[i]; /* compact: the first `deleted` are gone */
    }
    if (r < 0) {
        for (int i = 0; i < deleted; i++)
            if (parts[i].start >= 0 && parts[i].length > 0)
                ld_blkpg(dev_fd, BLKPG_ADD_PARTITION, parts[i].pno, parts[i].start,
                         parts[i].length);
        return r;
    }
    return deleted;
}

/* bound: 1 when the caller knows the device is bound (it attached it), -1
 * unknown: LOOP_GET_STATUS64 is asked only where the link count leaves a
 * doubt. A device without partitions costs one stat (the release path used to
 * ask GET_STATUS64 and stat every time). */
int ld_del_partitions(int dev_fd, int index, int bound)
{
    struct loop_info64 info;
    nlink_t nlink = 0;
    int r = link_count(index, &nlink);

    if (r != 0)
        return r > 0 ? 0 : r;
    if (surely_bare(nlink, 0))
        return 0;
    if (bound < 0)
        bound = ioctl(dev_fd, LOOP_GET_STATUS64, &info) == 0;
    else
        bound = bound > 0;
    if (surely_bare(nlink, bound))
        return 0;
    return del_partitions(dev_fd, index, bound, nlink);
}

/* Before binding: delete partitions an earlier binding left (they would point
 * into the new file). -EBUSY at LD_STAGE_CONFIGURE when the device is bound
 * (another allocator took it since GET_FREE): its partitions are not ours to
 * delete. The state is asked only when the link count leaves a doubt: a bare
 * unbound device needs no question, and LOOP_CONFIGURE and LOOP_SET_FD answer
 * EBUSY for a bound device themselves, under the device's lock
 * (drivers/block/loop.c, loop_configure(): "if (lo->lo_state != Lo_unbound)
 * goto out_unlock" with -EBUSY), so the LOOP_GET_STATUS64 asked before every
 * configure until issue 17 only ever duplicated that answer. */
static int clear_stale(int dev_fd, int index, int *stage)
{
    struct loop_info64 info;
    nlink_t nlink = 0;
    int r = link_count(index, &nlink);

    if (r == 0 && surely_bare(nlink, 0))
        return 0;
    if (r == 0 && ioctl(dev_fd, LOOP_GET_STATUS64, &info) == 0) {
        *stage = LD_STAGE_CONFIGURE;
        return -EBUSY;
    }
    if (r == 0)
        r = del_partitions(dev_fd, index, 0, nlink);
    if (r < 0) {
        *stage = LD_STAGE_PARTITIONS;
        return r;
    }
    return 0;
}

/* -------------------------------------------------------------- configure */

/* LOOP_CONFIGURE (5.8, commit 3448914e8cc5) copies its argument before
 * anything else, so a NULL argument answers EFAULT where it exists. Unknown
 * loop ioctls answer EINVAL, compat layers ENOTTY, qemu-user ENOSYS. Trying
 * beats kernel versions. */
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

/* The backing fd's path (readlink of /proc/self/fd/N, cut as below), kept
 * per thread for the file the fd had then: the readlink cost ~5 us, a third
 * of what loopdev added to a compat cycle over raw C, where an fstat costs
 * 0.4 us (issue 17; callers bind the same fd cycle after cycle). The file is
 * recognised by fd, device, inode and ctime: a rename, link or unlink of it
 * changes its ctime, so the name is read again ("... (deleted)" after an
 * unlink). A rename of a directory above it does not: lo_file_name then
 * keeps the name the file had at its first configure here, as losetup's
 * keeps the name it was given. */
static __thread struct {
    int fd;
    dev_t dev;
    ino_t ino;
    struct timespec ctime;
    char name[LO_NAME_SIZE];
} backing_name = { .fd = -1 };

static void read_backing_name(int backing_fd, char *out)
{
    struct stat st;
    char link[32];
    ssize_t n;
    int known = fstat(backing_fd, &st) == 0;

    if (known && backing_name.fd == backing_fd && backing_name.dev == st.st_dev &&
        backing_name.ino == st.st_ino && backing_name.ctime.tv_sec == st.st_ctim.tv_sec &&
        backing_name.ctime.tv_nsec == st.st_ctim.tv_nsec) {
        memcpy(out, backing_name.name, LO_NAME_SIZE);
        return;
    }
    name_n(link, "/proc/self/fd/", backing_fd);
    n = readlink(link, out, LO_NAME_SIZE - 1);
    out[n > 0 ? n : 0] = 0;
    backing_name.fd = known && n > 0 ? backing_fd : -1;
    backing_name.dev = st.st_dev;
    backing_name.ino = st.st_ino;
    backing_name.ctime = st.st_ctim;
    memcpy(backing_name.name, out, LO_NAME_SIZE);
}

/* lo_file_name is what GET_STATUS64 readers (losetup on old kernels, the
 * classic module's users) see: the caller's name, else the backing fd's path
 * as the kernel would cut it (LO_NAME_SIZE - 1 bytes and a NUL). */
static void set_file_name(struct loop_info64 *info, const struct ld_config *c, int backing_fd)
{
    if (c->file_name) {
        strncpy((char *)info->lo_file_name, c->file_name, LO_NAME_SIZE - 1);
        return;
    }
    read_backing_name(backing_fd, (char *)info->lo_file_name);
}

static int bind_configure(int dev_fd, int backing_fd, const struct ld_config *c, int scan,
                          int *stage)
{
    struct loop_config lc;
    memset(&lc, 0, sizeof(lc));
    lc.fd = (uint32_t)backing_fd;
    lc.block_size = c->block_size;
    lc.info.lo_offset = c->offset;
    lc.info.lo_sizelimit = c->sizelimit;
    lc.info.lo_flags = c->flags & (LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR);
    /* Asking for direct I/O here costs nothing; LOOP_SET_DIRECT_IO later
     * freezes the queue (about 17 ms on 6.18). The kernel falls back to
     * buffered I/O where the file refuses O_DIRECT; ld_configure's direct
     * I/O step and verify() handle that. */
    if (c->direct_io)
        lc.info.lo_flags |= LO_FLAGS_DIRECT_IO;
    if (scan)
        lc.info.lo_flags |= LO_FLAGS_PARTSCAN;
    set_file_name(&lc.info, c, backing_fd);
    *stage = LD_STAGE_CONFIGURE;
    return ioctl(dev_fd, LOOP_CONFIGURE, &lc) < 0 ? neg_errno() : 0;
}

/* LOOP_SET_FD takes read-only from the backing fd's mode (SET_STATUS64
 * cannot set it), so a read-only device over a writable fd binds a
 * read-only reopen of the same file. */
static int set_fd(int dev_fd, int backing_fd, const struct ld_config *c)
{
    int bind_fd = backing_fd, r;
    if ((c->flags & LO_FLAGS_READ_ONLY) && (fcntl(backing_fd, F_GETFL) & O_ACCMODE) != O_RDONLY) {
        char path[32];
        snprintf(path, sizeof(path), "/proc/self/fd/%d", backing_fd);
        bind_fd = open(path, O_RDONLY | O_CLOEXEC);
        if (bind_fd < 0)
            return neg_errno();
    }
    r = ioctl(dev_fd, LOOP_SET_FD, (unsigned long)bind_fd) < 0 ? neg_errno() : 0;
    if (bind_fd != backing_fd)
        close(bind_fd);
    return r;
}

/* Kernels before 5.8: SET_FD, then SET_STATUS64, then SET_BLOCK_SIZE. Sets
 * *bound once SET_FD succeeded (the caller clears it on a later failure). */
static int bind_legacy(int dev_fd, int backing_fd, const struct ld_config *c, int scan,
                       int *stage, int *bound)
{
    struct loop_info64 info;
    int r;

    *stage = LD_STAGE_SET_FD;
    r = set_fd(dev_fd, backing_fd, c);
    if (r < 0)
        return r;
    *bound = 1;
    memset(&info, 0, sizeof(info));
    info.lo_offset = c->offset;
    info.lo_sizelimit = c->sizelimit;
    info.lo_flags = c->flags & (scan ? LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN : LO_FLAGS_AUTOCLEAR);
    set_file_name(&info, c, backing_fd);
    *stage = LD_STAGE_SET_STATUS;
    r = ld_set_status(dev_fd, &info);
    if (r == 0 && c->block_size) {
        *stage = LD_STAGE_BLOCK_SIZE;
        r = ioctl_retry_eagain(dev_fd, LOOP_SET_BLOCK_SIZE, c->block_size);
    }
    return r;
}

/* Partscan in the same LOOP_CONFIGURE (or the fallback's one SET_STATUS64)
 * as everything else, while a second fd of the device holds an exclusive BSD
 * lock. Configuring with partscan sends a change event before the kernel
 * scans; a prober opening the device on it triggers a second scan that drops
 * and re-adds every partition (systemd PR #41425; blktests loop/012). udev
 * takes LOCK_SH|LOCK_NB before probing and skips a locked device
 * (systemd.io/BLOCK_DEVICE_LOCKING; systemd's loop-util.c holds this lock
 * while it configures), and the close of the lock fd makes it probe once,
 * after the scan. Until issue 17 the device was configured without partscan
 * and a separate LOOP_SET_STATUS64 turned it on: that one ioctl freezes the
 * queue and waits for an RCU grace period, 16 of the 19 ms of an
 * attach(partscan=True) here, against 0.16 ms for LOOP_CONFIGURE with
 * PARTSCAN (tests/test_budget.py::test_partscan_configures_once proves the
 * single configure under the lock; test_partscan_split_when_locked the
 * fallback). Where the lock cannot be had (no /proc to reopen the device
 * through; another holder, which may be a prober), the split stays. -1: no
 * lock. */
static int lock_for_setup(int dev_fd)
{
    char path[32];
    int fd;
    snprintf(path, sizeof(path), "/proc/self/fd/%d", dev_fd);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return -1;
    if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Verify what the kernel applied against the request. */
static int verify(int dev_fd, const struct ld_config *c, const struct loop_info64 *info)
{
    uint32_t want = c->flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN);
    int bs = 0;
    if (info->lo_offset != c->offset || info->lo_sizelimit != c->sizelimit)
        return -EINVAL;
    if ((info->lo_flags & (LO_FLAGS_AUTOCLEAR | LO_FLAGS_PARTSCAN)) != want)
        return -EINVAL;
    if ((c->flags & LO_FLAGS_READ_ONLY) && !(info->lo_flags & LO_FLAGS_READ_ONLY))
        return -EINVAL;
    if (c->direct_io == 2 && !(info->lo_flags & LO_FLAGS_DIRECT_IO))
        return -EINVAL;
    if (!c->block_size)
        return 0;
    if (ioctl(dev_fd, BLKSSZGET, &bs) < 0)
        return neg_errno();
    return (uint32_t)bs == c->block_size ? 0 : -EINVAL;
}

/* Request shapes (which of offset, size limit, block size, autoclear,
 * partscan, read-only were asked for) whose LOOP_CONFIGURE the read-back
 * found applied as asked, one bit per shape: decided by trying, remembered
 * per process, as for LOOP_CONFIGURE itself. What a kernel's LOOP_CONFIGURE
 * applies does not depend on the device or the file for these settings:
 * it applies each or refuses the call (drivers/block/loop.c, loop_configure:
 * loop_set_status_from_info() takes offset and size limit, lo_flags the
 * flags, blk_validate_block_size() refuses a bad block size with EINVAL).
 * The exceptions are kernel versions, not calls: vanilla 5.8 ignored the
 * size limit (fixed in 5.9 by commit 79e5dc59e297, "loop: Set correct device
 * size when using LOOP_CONFIGURE") and partscan (commit fe6a8fc5ed2f, "loop:
 * unset GENHD_FL_NO_PART_SCAN on LOOP_CONFIGURE"), so the first configure of
 * each shape is read back and a shape the kernel got wrong is never marked.
 * Direct I/O is never marked: the backing file decides whether the kernel
 * keeps it. This spares one LOOP_GET_STATUS64 per attach (issue 17). */
static uint64_t proven_shapes;

static unsigned config_shape(const struct ld_config *c, int scan)
{
    return (c->offset ? 1u : 0) | (c->sizelimit ? 2u : 0) | (c->block_size ? 4u : 0) |
           (c->flags & LO_FLAGS_AUTOCLEAR ? 8u : 0) | (scan ? 16u : 0) |
           (c->flags & LO_FLAGS_READ_ONLY ? 32u : 0);
}

static int shape_proven(unsigned shape)
{
    return (__atomic_load_n(&proven_shapes, __ATOMIC_RELAXED) >> shape) & 1;
}

static void prove_shape(unsigned shape)
{
    __atomic_fetch_or(&proven_shapes, (uint64_t)1 << shape, __ATOMIC_RELAXED);
}

/* Read back what the kernel applied, and finish what it did not: partscan
 * where LOOP_CONFIGURE ignored it (vanilla 5.8, util-linux PR #1152) or where
 * it was left out for want of the lock; direct I/O where asked and not on
 * (fallback path; "try" (1) keeps buffered I/O when the backing file refuses
 * O_DIRECT). Partscan by SET_STATUS64 passes the flags again, which also
 * survives kernels that cleared PARTSCAN on every SET_STATUS64 (fixed by
 * commit 5aa21b0495df). Then verify: vanilla 5.8 ignored sizelimit too, and
 * direct I/O can be refused silently. One LOOP_GET_STATUS64 when everything
 * was applied; none after a LOOP_CONFIGURE of a proven shape (above).
 * as_asked: 0 when partscan had to be turned on after the configure. */
static int settle(int dev_fd, const struct ld_config *c, int *stage, int *as_asked)
{
    struct loop_info64 info;
    int r;

    *as_asked = 1;

    *stage = LD_STAGE_VERIFY;
    if (ld_get_status(dev_fd, &info) < 0)
        return neg_errno();
    if ((c->flags & LO_FLAGS_PARTSCAN) && !(info.lo_flags & LO_FLAGS_PARTSCAN)) {
        *stage = LD_STAGE_SET_STATUS;
        *as_asked = 0;
        info.lo_flags = (info.lo_flags & LO_FLAGS_AUTOCLEAR) | LO_FLAGS_PARTSCAN;
        r = ld_set_status(dev_fd, &info);
        if (r == 0)
            r = ld_get_status(dev_fd, &info);
        if (r < 0)
            return r;
    }
    if (c->direct_io && !(info.lo_flags & LO_FLAGS_DIRECT_IO)) {
        *stage = LD_STAGE_DIRECT_IO;
        r = ioctl(dev_fd, LOOP_SET_DIRECT_IO, 1UL) < 0 ? neg_errno() : 0;
        if (r == 0)
            r = ld_get_status(dev_fd, &info);
        if (r < 0 && c->direct_io == 2)
            return r;
    }
    *stage = LD_STAGE_VERIFY;
    return verify(dev_fd, c, &info);
}

/* Bind and configure an open, unbound device; on failure nothing stays
 * bound. Since 3.7 (commit a1ecac3b0656) LOOP_CLR_FD on a device others hold
 * open only marks it autoclear; the unbind then happens when the last opener (normally our
 * caller, who closes the fd) goes (libblockdev #1170 leaked here).
 * dev_locked: the caller holds an exclusive flock on dev_fd already. */
static int configure(int dev_fd, int backing_fd, const struct ld_config *c, int dev_locked,
                     int *stage)
{
    int bound = 0, lock_fd = -1, scan = 0, r;
    if (c->flags & LO_FLAGS_PARTSCAN) {
        if (!dev_locked)
            lock_fd = lock_for_setup(dev_fd);
        scan = dev_locked || lock_fd >= 0;
    }
    int legacy = __atomic_load_n(&force_fallback, __ATOMIC_RELAXED) || !probe_configure(dev_fd);
    /* LOOP_CONFIGURE of a shape proven applied before needs no read-back;
     * partscan asked for but left out for want of the lock must be settled. */
    int trust = !legacy && !c->direct_io && (scan || !(c->flags & LO_FLAGS_PARTSCAN));
    unsigned shape = config_shape(c, scan);
    if (legacy) {
        r = bind_legacy(dev_fd, backing_fd, c, scan, stage, &bound);
    } else {
        r = bind_configure(dev_fd, backing_fd, c, scan, stage);
        bound = r == 0;
    }
    if (r == 0 && !(trust && shape_proven(shape))) {
        int as_asked;
        r = settle(dev_fd, c, stage, &as_asked);
        if (r == 0 && trust && as_asked)
            prove_shape(shape);
    }
    if (r < 0 && bound)
        ioctl(dev_fd, LOOP_CLR_FD, 0);
    if (lock_fd >= 0)
        close(lock_fd);
    if (r == 0)
        *stage = LD_STAGE_NONE;
    return r;
}

/* The one place that binds: partitions an earlier binding left go first
 * (they would point into the new file), then configure. */
static int bind_fresh(int dev_fd, int index, int dev_locked, int backing_fd,
                      const struct ld_config *config, int *stage)
{
    int r = clear_stale(dev_fd, index, stage);
    if (r < 0)
        return r;
    return configure(dev_fd, backing_fd, config, dev_locked, stage);
}

int ld_bind(int dev_fd, int index, int backing_fd, const struct ld_config *config, int *stage)
{
    return bind_fresh(dev_fd, index, 0, backing_fd, config, stage);
}

/* No lock on loop-control. systemd serialises its allocators with an
 * exclusive flock on it, and loopdev did too until issue 17, with a
 * process-wide mutex for threads: measured here with 8 processes (and with 8
 * threads) attaching at once on 2 cores, the lock made the p90 of a cycle
 * 3.1-10 ms (threads 3.3-4.0 ms) against 0.2-1.8 ms (threads 0.2 ms) for the
 * retry loop alone, 0 failures either way (bench/bench_table.py): a waiter
 * sleeps past the release of a holder that was preempted. The lock never
 * was a gate (losetup takes none; the races it avoided are retried: EBUSY
 * from LOOP_CONFIGURE, ENXIO from open), so only its cost remained. */

/* ------------------------------------------------------------ attach loop */

/* One ld_attach call's state: its deadline, the jitter seed, and the indexes
 * it gave up on for a reason that outlasts a retry (another process holds
 * the device locked, or a stale partition of it open). */
struct attach_state {
    int64_t deadline;
    struct sigwait sig;   /* the caller's signal mask, let in while napping */
    unsigned seed;
    int nskip;
    int skip[64];
};

/* One attempt's resources: released by attempt_once's single exit. */
struct attempt {
    int index;
    int fd;
};

#define TRANSIENT 1 /* an attempt's outcome: another round may succeed */

static int fail(struct ld_attach_res *res, int stage, int err)
{
    res->stage = stage;
    res->err = err;
    return err;
}

static int retry(struct ld_attach_res *res, int stage, int err)
{
    fail(res, stage, err);
    return TRANSIENT;
}

static int skipped(const struct attach_state *s, int index)
{
    for (int i = 0; i < s->nskip; i++)
        if (s->skip[i] == index)
            return 1;
    return 0;
}

static int skip_index(struct attach_state *s, int index)
{
    if (s->nskip < (int)(sizeof(s->skip) / sizeof(s->skip[0])))
        s->skip[s->nskip++] = index;
    return TRANSIENT;
}

/* GET_FREE names the lowest unbound index again and again, so one we must
 * skip would be offered until the retries ran out: ask for a new one. */
static int pick_index(const struct ld_attach_req *req, struct ld_attach_res *res,
                      struct attach_state *s, struct attempt *a)
{
    int index = ioctl(req->ctl_fd, LOOP_CTL_GET_FREE);
    if (index >= 0 && skipped(s, index))
        index = ioctl(req->ctl_fd, LOOP_CTL_ADD, -1);
    if (index < 0) /* untested: no minor can be added (ENOMEM, the minor space full) */
        return fail(res, LD_STAGE_GET_FREE, neg_errno());
    a->index = res->index = index;
    return 0;
}

static int sysfs_has(int index)
{
    char name[32];
    int sysfs = sysfs_block_fd();
    name_n(name, "loop", index);
    return sysfs >= 0 && faccessat(sysfs, name, F_OK, 0) == 0;
}

/* The device through a node of our own, made where dirfd had none (a
 * container's static /dev) or a wrong one: in a fresh root-only directory,
 * opened (with oflags' access mode), then unlinked with its directory, so
 * nothing persists. The node's numbers come from the part_shift the caller
 * read from sysfs. */
int ld_open_private(int dirfd, int index, int part_shift, int oflags)
{
    static unsigned serial;
    char dir[48], name[32];
    dev_t devt = makedev(LOOP_MAJOR, (unsigned)index << part_shift);
    int dfd, fd = -1, r = 0;

    snprintf(dir, sizeof(dir), ".loopdev-%d-%x", getpid(),
             __atomic_fetch_add(&serial, 1, __ATOMIC_RELAXED));
    name_n(name, "loop", index);
    if (mkdirat(dirfd, dir, 0700) < 0)
        return neg_errno();
    dfd = openat(dirfd, dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) /* untested: the directory just made; EMFILE/ENOMEM only */
        r = neg_errno();
    else if (mknodat(dfd, name, S_IFBLK | 0600, devt) < 0)
        r = neg_errno();
    else {
        fd = openat(dfd, name, (oflags & O_ACCMODE) | O_CLOEXEC);
        if (fd < 0)
            r = neg_errno();
        unlinkat(dfd, name, 0);
    }
    if (dfd >= 0)
        close(dfd);
    unlinkat(dirfd, dir, AT_REMOVEDIR);
    return r < 0 ? r : fd;
}

/* 0: fd is block device loopN; else -ENODEV with what it is in res. */
int ld_check_node(int fd, int index, int part_shift, struct ld_attach_res *res)
{
    struct stat st;
    if (fstat(fd, &st) < 0) /* untested: fstat of an open fd does not fail */
        return neg_errno();
    if (S_ISBLK(st.st_mode) && st.st_rdev == makedev(LOOP_MAJOR, (unsigned)index << part_shift))
        return 0;
    res->rdev = st.st_rdev;
    res->mode = st.st_mode;
    return -ENODEV;
}

/* The one device check, for the attach loop and for opening a device by
 * number (loopdev._engine.open_device): an fd of loopN below dirfd that is
 * block device 7:(N << part_shift), never another disk's node. */
int ld_open_device(int dirfd, int index, int part_shift, int private_nodes, int oflags,
                   struct ld_attach_res *res)
{
    char name[32];
    int fd, r;

    name_n(name, "loop", index);
    fd = openat(dirfd, name, (oflags & O_ACCMODE) | O_CLOEXEC);
    if (fd < 0) {
        r = neg_errno();
        /* ENOENT for a device sysfs has: a node that never existed. */
        if (r != -ENOENT || !private_nodes || !sysfs_has(index))
            return fail(res, LD_STAGE_OPEN, r);
    } else {
        r = ld_check_node(fd, index, part_shift, res);
        if (r == 0)
            return fd;
        close(fd);
        if (r != -ENODEV || !private_nodes)
            return fail(res, LD_STAGE_CHECK, r);
    }
    r = ld_open_private(dirfd, index, part_shift, oflags);
    return r < 0 ? fail(res, LD_STAGE_NODE, r) : r;
}

static int open_device(const struct ld_attach_req *req, struct ld_attach_res *res,
                       struct attempt *a)
{
    int r = ld_open_device(req->dev_dirfd, a->index, req->part_shift, req->private_nodes,
                           O_RDWR, res);
    if (r >= 0) {
        a->fd = r;
        return 0;
    }
    /* Since 5.x (6.11: commit 18048c1af783) opening a device in autoclear
     * rundown or being removed answers ENXIO, or ENOENT once its node is
     * gone: another process released it right after GET_FREE named it (for
     * a private node, untested: removed by LOOP_CTL_REMOVE since then). */
    if (r == -ENXIO || (r == -ENOENT && res->stage == LD_STAGE_OPEN && !sysfs_has(a->index)))
        return retry(res, LD_STAGE_OPEN, r);
    return r;
}

/* The hook runs Python code of the caller's (it may allocate devices
 * itself). It owns the fd from now on. */
/* The hook runs with the caller's signal mask (Ctrl-C may end it); the next
 * nap blocks signals again. */
static int run_hook(const struct ld_attach_req *req, struct ld_attach_res *res,
                    struct attach_state *s, struct attempt *a)
{
    int r;

    if (!req->on_open)
        return 0;
    unblock(&s->sig);
    r = req->on_open(req->ctx, a->index, a->fd);
    if (req->resume)
        block(&s->sig);
    if (r != 0) {
        /* -1: the hook raised and closed the fd. Else it never ran (a
         * signal's handler raised as Python entered the trampoline): the fd
         * is still ours. */
        if (r != -1)
            close(a->fd);
        a->fd = -1;
        return fail(res, LD_STAGE_HOOK, -ECANCELED);
    }
    return 0;
}

static int lock_device(const struct ld_attach_req *req, struct ld_attach_res *res,
                       struct attach_state *s, struct attempt *a)
{
    if (!req->lock || flock(a->fd, LOCK_EX | LOCK_NB) == 0)
        return 0;
    fail(res, LD_STAGE_LOCK, neg_errno());
    return res->err == -EWOULDBLOCK ? skip_index(s, a->index) : res->err;
}

/* Bound means taken: another allocator (one that takes no lock, like
 * losetup) bound it since GET_FREE; clear_stale or the configure ioctl
 * itself answers EBUSY then. */
static int bind_device(const struct ld_attach_req *req, struct ld_attach_res *res,
                       struct attach_state *s, struct attempt *a)
{
    int stage = LD_STAGE_CONFIGURE, r;

    r = bind_fresh(a->fd, a->index, req->lock, req->backing_fd, &req->config, &stage);
    if (r == 0)
        return 0;
    fail(res, stage, r);
    /* A stale partition is open: use another device. */
    if (stage == LD_STAGE_PARTITIONS && r == -EBUSY)
        return skip_index(s, a->index);
    /* EBUSY before anything was bound: another process bound this index
     * since GET_FREE, or pages of its previous file are still being released
     * (osbuild #177), or since 6.11 (commit 18048c1af783) its last opener
     * has not closed it yet. All pass; another round picks a free device.
     * Not skipped (LOOP_CTL_ADD): every race would leave a new minor behind. */
    if (r == -EBUSY && (stage == LD_STAGE_CONFIGURE || stage == LD_STAGE_SET_FD))
        return TRANSIENT;
    return r;
}

/* Nonzero: the discard hook raised (its exception goes to the caller, so
 * the attach stops here). */
static int discard(const struct ld_attach_req *req, int fd)
{
    if (req->on_open)
        return req->on_discard(req->ctx, fd);
    close(fd);
    return 0;
}

/* One attempt: 0 done, TRANSIENT, or -errno (fatal). */
static int attempt_once(const struct ld_attach_req *req, struct ld_attach_res *res,
                        struct attach_state *s)
{
    struct attempt a = { -1, -1 };
    int r = pick_index(req, res, s, &a);

    if (r == 0)
        r = open_device(req, res, &a);
    if (r == 0)
        r = run_hook(req, res, s, &a);
    if (r == 0)
        r = lock_device(req, res, s, &a);
    if (r == 0)
        r = bind_device(req, res, s, &a);
    if (r == 0) {
        res->fd = a.fd;
        res->err = 0;
        res->stage = LD_STAGE_NONE;
    } else if (a.fd >= 0 && discard(req, a.fd) != 0) {
        r = fail(res, LD_STAGE_HOOK, -ECANCELED);
    }
    return r;
}

/* Contention backoff (as systemd does): a few immediate retries, then a
 * random sleep whose ceiling grows from 10 ms to 250 ms, so that competing
 * allocators stop meeting on the same minor. */
#define FIRST_NAP 3 /* the attempt that naps first */
static int backoff(const struct ld_attach_req *req, int attempt, unsigned *seed,
                   struct sigwait *sw)
{
    long ceiling_us;
    if (attempt < FIRST_NAP)
        return 0;
    if (!req->resume)
        return -EINTR; /* back to the caller before the first nap (see struct sigwait) */
    ceiling_us = 10000L << (attempt - FIRST_NAP > 5 ? 5 : attempt - FIRST_NAP);
    if (ceiling_us > 250000L)
        ceiling_us = 250000L;
    return nap_us(1000 + (long)(rand_r(seed) % ceiling_us), sw);
}

static int attach_loop(const struct ld_attach_req *req, struct ld_attach_res *res,
                       struct attach_state *s)
{
    int attempts = req->max_attempts > 0 ? req->max_attempts : 64;
    /* A call again after an interruption goes on where the backoff was: its
     * first step is a nap (with signals blocked since the start). */
    for (int attempt = req->resume ? FIRST_NAP : 0; attempt < attempts; attempt++) {
        int r;
        if (attempt > 0) {
            res->retries++;
            /* Untested: the deadline (30 s of lost races; the 64 attempts run
             * out first in test_exhausted_candidates_fail_within_bound). */
            if (backoff(req, attempt, &s->seed, &s->sig) < 0)
                return fail(res, LD_STAGE_INTERRUPTED, -EINTR);
            if (now_us() > s->deadline)
                break;
        }
        r = attempt_once(req, res, s);
        if (r <= 0)
            return r;
    }
    res->exhausted = 1; /* err and stage keep the last race seen */
    res->fd = -1;
    return res->err ? res->err : -EBUSY;
}

int ld_attach(const struct ld_attach_req *req, struct ld_attach_res *res)
{
    struct attach_state s;
    int retries = req->resume ? res->retries : 0; /* the rounds before the return */
    int r;

    memset(&s, 0, sizeof(s));
    s.deadline = now_us() + 1000L * (req->timeout_ms > 0 ? req->timeout_ms : 30000);
    s.seed = jitter_seed();
    memset(res, 0, sizeof(*res));
    res->fd = -1;
    res->index = -1;
    res->retries = retries;
    if (req->resume)
        block(&s.sig);
    r = attach_loop(req, res, &s);
    unblock(&s.sig);
    return r;
}

/* ------------------------------------------------------------ fast paths */

/* The compat cycle's two native calls (and attach()'s, where nothing is
 * done around them) take scalars and answer a scalar: filling a result
 * struct from Python (cffi attribute access) cost more than the calls
 * themselves (issue 17: 59k user-space instructions a cycle). Failures
 * leave their details here, per thread, for the caller's error path
 * (ld_last_res). */
static __thread struct ld_attach_res last_res;
static __thread long last_token;
static __thread int last_claimed;

/* ld_attach without hooks: (index << 32) | fd, or -errno (details in
 * ld_last_res). base: the caller's request with what stays the same from one
 * call to the next (loop-control, the node directory, private_nodes,
 * part_shift), filled once; the call's own fields are set on a copy
 * (file_name: for lo_file_name, NULL for the backing fd's path). token: the
 * caller's number for this call, for ld_claim. */
int64_t ld_attach_plain(const struct ld_attach_req *base, int backing_fd, uint32_t flags,
                        uint64_t offset, uint64_t sizelimit, uint32_t block_size, int lock,
                        int direct_io, const char *file_name, long token)
{
    struct ld_attach_req req = *base;
    int r;

    /* The caller's call again (same token) after this thread's last call
     * returned interrupted. */
    req.resume = last_res.stage == LD_STAGE_INTERRUPTED && token == last_token;
    req.backing_fd = backing_fd;
    req.lock = lock;
    req.config.offset = offset;
    req.config.sizelimit = sizelimit;
    req.config.block_size = block_size;
    req.config.flags = flags;
    req.config.direct_io = direct_io;
    req.config.file_name = file_name;
    last_token = token;
    last_claimed = 0;
    r = ld_attach(&req, &last_res);
    if (r < 0)
        return r;
    return ((int64_t)last_res.index << 32) | (uint32_t)last_res.fd;
}

int64_t ld_attach_flags(const struct ld_attach_req *base, int backing_fd, uint32_t flags,
                        long token)
{
    return ld_attach_plain(base, backing_fd, flags, 0, 0, 0, 0, 0, NULL, token);
}

void ld_last_res(struct ld_attach_res *out)
{
    *out = last_res;
}

/* The device fd ld_attach_plain(token) opened, once: for a caller whose
 * signal handler raised as the call returned, before it took the result.
 * -1 when that call bound nothing, or was not the last of this thread. */
int ld_claim(long token)
{
    if (token != last_token || last_claimed || last_res.err != 0)
        return -1;
    last_claimed = 1;
    return last_res.fd;
}

int ld_last_stage(void)
{
    return last_res.stage;
}

/* Partitions, then LOOP_CLR_FD (see ld_del_partitions): -errno, with the
 * step in ld_last_res's stage (LD_STAGE_PARTITIONS, else LD_STAGE_NONE).
 * bound: nonzero when the caller knows the device is bound, 0 unknown (a
 * Python bool, as it is). */
int ld_release(int dev_fd, int index, int bound)
{
    int r = ld_del_partitions(dev_fd, index, bound ? 1 : -1);
    last_res.stage = LD_STAGE_PARTITIONS;
    if (r < 0)
        return r;
    last_res.stage = LD_STAGE_NONE;
    return ioctl(dev_fd, LOOP_CLR_FD, 0) < 0 ? neg_errno() : 0;
}

/* ------------------------------------------------------------ bind mounts */

/* A bind mount of an existing node needs CAP_SYS_ADMIN in the mount
 * namespace only, where mknod needs CAP_MKNOD (containers often lack it). */
int ld_bind_mount(const char *source, const char *target)
{
    return mount(source, target, NULL, MS_BIND, NULL) < 0 ? neg_errno() : 0;
}

int ld_unmount(const char *target)
{
    return umount2(target, MNT_DETACH) < 0 ? neg_errno() : 0;
}

/* ------------------------------------------------------------ sysfs reads */

/* Read attribute `path` below dirfd into buf (NUL-terminated, trailing
 * newline dropped); returns its length or -errno. */
static int read_attr(int dirfd, const char *path, char *buf, size_t size)
{
    ssize_t n;
    int fd = openat(dirfd, path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return neg_errno();
    n = read(fd, buf, size - 1);
    if (n < 0)
        n = neg_errno();
    close(fd);
    if (n < 0)
        return (int)n;
    if (n > 0 && buf[n - 1] == '\n')
        n--;
    buf[n] = 0;
    return (int)n;
}

static int read_u64(int dirfd, const char *path, uint64_t *out)
{
    char buf[32];
    int r = read_attr(dirfd, path, buf, sizeof(buf));
    if (r < 0)
        return r;
    *out = strtoull(buf, NULL, 10);
    return 0;
}

static int read_int(int dirfd, const char *path, int *out)
{
    uint64_t v = 0;
    int r = read_u64(dirfd, path, &v);
    *out = (int)v;
    return r;
}

/* -ENXIO when the device is not bound (or went away while we read). The
 * kernel answers ENODEV or ENXIO, not only ENOENT, for attributes of a
 * device unbound under us (6.x). */
int ld_sysfs_info(const char *name, struct ld_sysfs_info *out)
{
    int sysfs = sysfs_block_fd(), dirfd, r;

    if (sysfs < 0)
        return -ENOENT;
    dirfd = openat(sysfs, name, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) /* a device removed under us: ENODEV on 6.x, as for read below */
        return errno == ENOENT || errno == ENODEV ? -ENXIO : neg_errno();
    r = read_attr(dirfd, "loop/backing_file", out->backing, sizeof(out->backing));
    out->backing_len = r;
    if (r >= 0)
        r = read_u64(dirfd, "loop/offset", &out->offset);
    if (r >= 0)
        r = read_u64(dirfd, "loop/sizelimit", &out->sizelimit);
    if (r >= 0)
        r = read_int(dirfd, "loop/autoclear", &out->autoclear);
    if (r >= 0)
        r = read_int(dirfd, "loop/partscan", &out->partscan);
    if (r >= 0)
        r = read_int(dirfd, "loop/dio", &out->direct_io);
    if (r >= 0)
        r = read_int(dirfd, "ro", &out->read_only);
    if (r >= 0)
        r = read_int(dirfd, "queue/logical_block_size", &out->block_size);
    if (r >= 0)
        r = read_u64(dirfd, "size", &out->sectors);
    close(dirfd);
    if (r == -ENOENT || r == -ENODEV || r == -ENOTDIR || (r >= 0 && out->backing_len == 0))
        return -ENXIO;
    return r < 0 ? r : 0;
}

/* ------------------------------------------------------------------ crc32 */

/* CRC-32 as zlib's crc32() and the kernel's efi_crc32() compute it for a GPT
 * (reflected polynomial 0xEDB88320, all ones in and out): here because
 * importing zlib cost 0.3 ms of `import loopdev` (issue 17). Eight bytes a
 * step through eight tables ("slicing-by-8"): 8.5 us for a 16 KiB entry
 * array here, where a byte at a time took 40 us and zlib.crc32 5. */
static uint32_t crc32_table[8][256];

static void crc32_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc32_table[0][n] = c;
    }
    for (int t = 1; t < 8; t++)
        for (int n = 0; n < 256; n++)
            crc32_table[t][n] = (crc32_table[t - 1][n] >> 8) ^
                                crc32_table[0][crc32_table[t - 1][n] & 0xFF];
}

static uint32_t le32(const unsigned char *p)
{
    return p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

uint32_t ld_crc32(const char *data, size_t len)
{
    const unsigned char *p = (const unsigned char *)data;
    const uint32_t(*t)[256] = crc32_table;
    uint32_t c = 0xFFFFFFFFu;

    for (; len >= 8; p += 8, len -= 8) {
        uint32_t a = c ^ le32(p), b = le32(p + 4);
        c = t[7][a & 0xFF] ^ t[6][a >> 8 & 0xFF] ^ t[5][a >> 16 & 0xFF] ^ t[4][a >> 24] ^
            t[3][b & 0xFF] ^ t[2][b >> 8 & 0xFF] ^ t[1][b >> 16 & 0xFF] ^ t[0][b >> 24];
    }
    while (len--)
        c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}
