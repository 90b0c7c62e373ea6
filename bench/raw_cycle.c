/* Raw-ioctl cost of one attach + release cycle: the baseline loopdev is measured
 * against (bench_attach.py compiles and runs it). No lock, no node check, no
 * read-back: only what the kernel needs.
 *
 * usage: raw_cycle CYCLES BACKING_FILE clr|close
 *   clr:   LOOP_CTL_GET_FREE, open, LOOP_CONFIGURE (autoclear), LOOP_CLR_FD, close
 *   close: LOOP_CTL_GET_FREE, open, LOOP_CONFIGURE (autoclear), close
 * A minor taken or removed by another process between GET_FREE and open or
 * configure (ENXIO, ENOENT, EBUSY) is retried and counted. Prints "retries N", then the time of
 * each cycle in ns, one a line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* One cycle; returns 0, 1 to retry with another minor, or -1 on error. */
static int cycle(int ctl, int backing, int clear)
{
    struct loop_config cfg;
    char name[32];
    int minor, fd;

    minor = ioctl(ctl, LOOP_CTL_GET_FREE);
    if (minor < 0) {
        perror("LOOP_CTL_GET_FREE");
        return -1;
    }
    snprintf(name, sizeof(name), "/dev/loop%d", minor);
    fd = open(name, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENXIO || errno == ENOENT)
            return 1; /* released or removed by another process since GET_FREE */
        perror(name);
        return -1;
    }
    memset(&cfg, 0, sizeof(cfg));
    cfg.fd = (unsigned int)backing;
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
    if (ioctl(fd, LOOP_CONFIGURE, &cfg) < 0) {
        int err = errno;

        close(fd);
        if (err == EBUSY || err == ENXIO)
            return 1; /* bound, or being removed, by another process since GET_FREE */
        errno = err;
        perror("LOOP_CONFIGURE");
        return -1;
    }
    if (clear && ioctl(fd, LOOP_CLR_FD, 0) < 0) {
        perror("LOOP_CLR_FD");
        close(fd);
        return -1;
    }
    close(fd); /* the last close unbinds (autoclear; CLR_FD also sets it) */
    return 0;
}

int main(int argc, char **argv)
{
    long cycles, retries = 0;
    long long *times;
    int ctl, backing, clear;

    if (argc != 4 || (strcmp(argv[3], "clr") && strcmp(argv[3], "close"))) {
        fprintf(stderr, "usage: %s CYCLES BACKING_FILE clr|close\n", argv[0]);
        return 2;
    }
    cycles = strtol(argv[1], NULL, 10);
    clear = strcmp(argv[3], "clr") == 0;
    ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    backing = open(argv[2], O_RDWR | O_CLOEXEC);
    times = calloc(cycles > 0 ? cycles : 1, sizeof(*times));
    if (ctl < 0 || backing < 0 || !times) {
        perror("setup");
        return 1;
    }
    for (long i = 0; i < cycles; i++) {
        long long t0 = now_ns();
        int attempt, rc = 1;

        for (attempt = 0; attempt < 1000 && rc == 1; attempt++) {
            rc = cycle(ctl, backing, clear);
            retries += rc == 1;
        }
        if (rc != 0) {
            if (rc == 1)
                fprintf(stderr, "no device after 1000 attempts\n");
            return 1;
        }
        times[i] = now_ns() - t0;
    }
    printf("retries %ld\n", retries);
    for (long i = 0; i < cycles; i++)
        printf("%lld\n", times[i]);
    return 0;
}
