/* Fault injection at the system-call boundary, for loopdev's tests only: an
 * LD_PRELOAD library that tests/test_faults.py compiles into a temporary
 * directory. It is not part of the package and never shipped.
 *
 * LOOPDEV_FAULTS holds rules separated by ';', each CALL:MATCH:ACTION:COUNT
 *   CALL    open   (open, open64, openat, openat64 and their fortified _2 forms)
 *           ioctl
 *           flock
 *   MATCH   open:  an fnmatch(3) pattern for the base name of the path given
 *           flock: an fnmatch(3) pattern for the base name of the fd's file
 *           ioctl: the request number (0x4c0a or 19466), taken by the tests
 *                  from loopdev._native, never written by hand
 *   ACTION  an errno name (ENXIO, EBUSY, ...) or number: fail the call with it
 *                  without making it
 *           drop_sizelimit: make the call with lo_sizelimit zeroed in a copy of
 *                  the argument of LOOP_CONFIGURE or LOOP_SET_STATUS64 (vanilla
 *                  5.8 ignored the size limit in LOOP_CONFIGURE)
 *           drop_partscan: make LOOP_CONFIGURE with LO_FLAGS_PARTSCAN cleared in
 *                  a copy of its argument (vanilla 5.8 ignored it too)
 *           count: change nothing; only log the call
 *           sigint+ERRNO: send SIGINT to the process, then fail the call with
 *                  ERRNO (a Ctrl-C that lands in the middle of a lost race)
 *           sigint: send SIGINT to the process, then make the call
 *   COUNT   how many matching calls the action applies to; the rest pass.
 *           '*': every one.
 * The first rule that matches a call and still has count left applies to it.
 * An ioctl whose argument is 0 is never acted on: loopdev probes for
 * LOOP_CONFIGURE with a NULL argument, and failing that call would fake the
 * probe's answer, not a failing configure.
 *
 * LOOPDEV_FAULTS_LOG names a file that gets, when a call returns, one line
 * per rule it matched:
 *   "<rule index> <what> <ns> <errno>\n"
 *   what   fire: the action was applied; pass: this rule did not act on the
 *          call (every call of a count rule); skip: an ioctl with argument 0
 *   ns     CLOCK_MONOTONIC in nanoseconds (Python's time.monotonic_ns()), so a
 *          test can time what followed a fault without counting lock waits
 *          before it
 *   errno  how the call ended: 0 for success (a drop_sizelimit call is made,
 *          and the kernel may still refuse it)
 * Each line is one O_APPEND write(2), so threads and processes do not mix.
 * A rule that cannot be parsed ends the process with exit status 97.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <linux/loop.h>

enum call { CALL_OPEN, CALL_IOCTL, CALL_FLOCK };
enum action { ACT_ERRNO, ACT_SIGINT, ACT_DROP_SIZELIMIT, ACT_DROP_PARTSCAN, ACT_COUNT };

struct rule {
    enum call call;
    char pattern[128];          /* open, flock */
    unsigned long request;      /* ioctl */
    enum action action;
    int err;                    /* ACT_ERRNO, ACT_SIGINT */
    long count;                 /* -1: every call */
    long applied;               /* atomic */
};

#define MAX_RULES 16
static struct rule rules[MAX_RULES];
static int n_rules;
static const char *log_path;

static const struct { const char *name; int value; } errno_names[] = {
    { "ENXIO", ENXIO },   { "ENOENT", ENOENT }, { "EBUSY", EBUSY },   { "EAGAIN", EAGAIN },
    { "EWOULDBLOCK", EWOULDBLOCK }, { "EINTR", EINTR }, { "EIO", EIO }, { "EPERM", EPERM },
    { "EACCES", EACCES }, { "EINVAL", EINVAL }, { "ENOMEM", ENOMEM }, { "ENOLCK", ENOLCK },
    { "ENODEV", ENODEV }, { "EROFS", EROFS },
};

static void die(const char *what, const char *text)
{
    fprintf(stderr, "faults.so: bad LOOPDEV_FAULTS rule '%s': %s\n", text, what);
    _exit(97);
}

static int parse_errno(const char *s)
{
    char *end;
    long v;
    for (size_t i = 0; i < sizeof(errno_names) / sizeof(errno_names[0]); i++)
        if (strcmp(s, errno_names[i].name) == 0)
            return errno_names[i].value;
    v = strtol(s, &end, 10);
    return (*s && !*end && v > 0) ? (int)v : -1;
}

static void parse_rule(char *text, struct rule *r)
{
    char copy[256], *save = NULL, *f[4];
    int n = 0;
    snprintf(copy, sizeof(copy), "%s", text);
    for (char *tok = strtok_r(text, ":", &save); tok && n < 4; tok = strtok_r(NULL, ":", &save))
        f[n++] = tok;
    if (n != 4 || strtok_r(NULL, ":", &save))
        die("want CALL:MATCH:ACTION:COUNT", copy);

    if (strcmp(f[0], "open") == 0)
        r->call = CALL_OPEN;
    else if (strcmp(f[0], "ioctl") == 0)
        r->call = CALL_IOCTL;
    else if (strcmp(f[0], "flock") == 0)
        r->call = CALL_FLOCK;
    else
        die("CALL is open, ioctl or flock", copy);

    if (r->call == CALL_IOCTL) {
        char *end;
        r->request = strtoul(f[1], &end, 0);
        if (*end)
            die("an ioctl MATCH is a request number", copy);
    } else {
        snprintf(r->pattern, sizeof(r->pattern), "%s", f[1]);
    }

    if (strcmp(f[2], "drop_sizelimit") == 0) {
        r->action = ACT_DROP_SIZELIMIT;
        if (r->call != CALL_IOCTL ||
            (r->request != LOOP_CONFIGURE && r->request != LOOP_SET_STATUS64))
            die("drop_sizelimit is for LOOP_CONFIGURE and LOOP_SET_STATUS64", copy);
    } else if (strcmp(f[2], "drop_partscan") == 0) {
        r->action = ACT_DROP_PARTSCAN;
        if (r->call != CALL_IOCTL || r->request != LOOP_CONFIGURE)
            die("drop_partscan is for LOOP_CONFIGURE", copy);
    } else if (strcmp(f[2], "count") == 0) {
        r->action = ACT_COUNT;
    } else if (strcmp(f[2], "sigint") == 0) {
        r->action = ACT_SIGINT; /* err 0: the call is made */
    } else if (strncmp(f[2], "sigint+", 7) == 0) {
        r->action = ACT_SIGINT;
        r->err = parse_errno(f[2] + 7);
        if (r->err < 0)
            die("unknown errno after sigint+", copy);
    } else {
        r->action = ACT_ERRNO;
        r->err = parse_errno(f[2]);
        if (r->err < 0)
            die("unknown ACTION", copy);
    }

    if (strcmp(f[3], "*") == 0) {
        r->count = -1;
    } else {
        char *end;
        r->count = strtol(f[3], &end, 10);
        if (*end || r->count < 0)
            die("COUNT is a number or '*'", copy);
    }
}

__attribute__((constructor)) static void load_rules(void)
{
    const char *env = getenv("LOOPDEV_FAULTS");
    char *text, *save = NULL;
    log_path = getenv("LOOPDEV_FAULTS_LOG");
    if (!env || !*env)
        return;
    text = strdup(env);
    for (char *tok = strtok_r(text, ";", &save); tok; tok = strtok_r(NULL, ";", &save)) {
        if (!*tok)
            continue;
        if (n_rules == MAX_RULES)
            die("too many rules", tok);
        parse_rule(tok, &rules[n_rules++]);
    }
    free(text);
}

/* Raw system calls: logging must not go through the wrappers below. */
static void log_line(int index, const char *what, int err)
{
    char line[80];
    int fd, len;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    len = snprintf(line, sizeof(line), "%d %s %lld %d\n", index, what,
                   (long long)now.tv_sec * 1000000000LL + now.tv_nsec, err);
    fd = (int)syscall(SYS_openat, AT_FDCWD, log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC,
                      0600);
    if (fd >= 0) {
        if (syscall(SYS_write, fd, line, (size_t)len) < 0) {
            /* nothing to do: the test will miss a line and fail */
        }
        syscall(SYS_close, fd);
    }
}

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

static int matches(const struct rule *r, enum call call, const char *name, unsigned long request)
{
    if (r->call != call)
        return 0;
    if (call == CALL_IOCTL)
        return r->request == request;
    return name && fnmatch(r->pattern, name, 0) == 0;
}

/* The rules one call matched, and what each did with it. */
struct verdict {
    int chosen; /* the rule whose action applies; -1: none */
    int n;
    int rule[MAX_RULES];
    const char *what[MAX_RULES];
};

static void decide(struct verdict *v, enum call call, const char *name, unsigned long request,
                   int may_act)
{
    v->chosen = -1;
    v->n = 0;
    for (int i = 0; i < n_rules; i++) {
        struct rule *r = &rules[i];
        const char *what = "pass";
        if (!matches(r, call, name, request))
            continue;
        if (r->action != ACT_COUNT && !may_act) {
            what = "skip";
        } else if (v->chosen < 0 && r->action != ACT_COUNT) {
            long before = __atomic_fetch_add(&r->applied, 1, __ATOMIC_RELAXED);
            if (r->count < 0 || before < r->count) {
                v->chosen = i;
                what = "fire";
            }
        }
        v->rule[v->n] = i;
        v->what[v->n++] = what;
    }
}

/* Log the call's outcome; returns `ret` with errno as the call left it. */
static int done(const struct verdict *v, int ret)
{
    int saved = errno;
    if (log_path)
        for (int i = 0; i < v->n; i++)
            log_line(v->rule[i], v->what[i], ret < 0 ? saved : 0);
    errno = saved;
    return ret;
}

/* For a sigint rule: send the signal; nonzero when the call is to be made. */
static int signal_first(const struct verdict *v)
{
    if (v->chosen < 0 || rules[v->chosen].action != ACT_SIGINT)
        return 0;
    kill(getpid(), SIGINT);
    return rules[v->chosen].err == 0;
}

/* Fail the call with the chosen rule's errno. */
static int fail(const struct verdict *v)
{
    errno = rules[v->chosen].err;
    return done(v, -1);
}

/* The next definition of `name` (libc's), looked up at the first call: a
 * library loaded before us may call it before our constructor runs. */
static void *next(void **slot, const char *name)
{
    void *fn = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (!fn) {
        fn = dlsym(RTLD_NEXT, name);
        __atomic_store_n(slot, fn, __ATOMIC_RELAXED);
    }
    return fn;
}

#define REAL(name) ((__typeof__(real_##name))next((void **)&real_##name, #name))
#define NEEDS_MODE(flags) (((flags) & O_CREAT) || ((flags) & O_TMPFILE) == O_TMPFILE)

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);

/* One wrapper per symbol: glibc exports them all, and which one a caller
 * binds to depends on _FILE_OFFSET_BITS and _FORTIFY_SOURCE. */
#define OPEN_WRAPPER(name, proto, args)                                                          \
    int name proto                                                                               \
    {                                                                                            \
        struct verdict v;                                                                        \
        mode_t mode = 0;                                                                         \
        if (NEEDS_MODE(flags)) {                                                                 \
            va_list ap;                                                                          \
            va_start(ap, flags);                                                                 \
            mode = va_arg(ap, mode_t);                                                           \
            va_end(ap);                                                                          \
        }                                                                                        \
        decide(&v, CALL_OPEN, base_name(path), 0, 1);                                            \
        if (v.chosen >= 0 && !signal_first(&v))                                                  \
            return fail(&v);                                                                     \
        return done(&v, REAL(name) args);                                                        \
    }

OPEN_WRAPPER(open, (const char *path, int flags, ...), (path, flags, mode))
OPEN_WRAPPER(open64, (const char *path, int flags, ...), (path, flags, mode))
OPEN_WRAPPER(openat, (int dirfd, const char *path, int flags, ...), (dirfd, path, flags, mode))
OPEN_WRAPPER(openat64, (int dirfd, const char *path, int flags, ...), (dirfd, path, flags, mode))

int __open_2(const char *path, int flags) { return open(path, flags); }
int __open64_2(const char *path, int flags) { return open64(path, flags); }
int __openat_2(int dirfd, const char *path, int flags) { return openat(dirfd, path, flags); }
int __openat64_2(int dirfd, const char *path, int flags) { return openat64(dirfd, path, flags); }

static int (*real_ioctl)(int, unsigned long, ...);

int ioctl(int fd, unsigned long request, ...)
{
    struct verdict v;
    va_list ap;
    unsigned long arg;
    va_start(ap, request);
    arg = va_arg(ap, unsigned long);
    va_end(ap);

    decide(&v, CALL_IOCTL, NULL, request, arg != 0);
    if (v.chosen < 0 || signal_first(&v))
        return done(&v, REAL(ioctl)(fd, request, arg));
    if (rules[v.chosen].action == ACT_ERRNO || rules[v.chosen].action == ACT_SIGINT)
        return fail(&v);
    if (rules[v.chosen].action == ACT_DROP_PARTSCAN) {
        struct loop_config config = *(const struct loop_config *)arg;
        config.info.lo_flags &= ~(unsigned)LO_FLAGS_PARTSCAN;
        return done(&v, REAL(ioctl)(fd, request, &config));
    }
    /* ACT_DROP_SIZELIMIT: the kernel gets a copy without the size limit. */
    if (request == LOOP_CONFIGURE) {
        struct loop_config config = *(const struct loop_config *)arg;
        config.info.lo_sizelimit = 0;
        return done(&v, REAL(ioctl)(fd, request, &config));
    }
    struct loop_info64 info = *(const struct loop_info64 *)arg;
    info.lo_sizelimit = 0;
    return done(&v, REAL(ioctl)(fd, request, &info));
}

static int (*real_flock)(int, int);

int flock(int fd, int operation)
{
    struct verdict v;
    char link[64], target[4096];
    ssize_t len;
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    len = readlink(link, target, sizeof(target) - 1);
    target[len > 0 ? len : 0] = '\0';
    decide(&v, CALL_FLOCK, base_name(target), 0, 1);
    if (v.chosen >= 0 && !signal_first(&v))
        return fail(&v);
    return done(&v, REAL(flock)(fd, operation));
}
