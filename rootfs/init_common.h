/* What both of the image's inits do before Python runs (launcher.c, which execs
 * python3.11, and staticinit.c, which embeds it): pick the hash seed without blocking, and
 * report a failure on stderr and in the kernel log, then power off as PID 1. Included by
 * both; rootfs/launcher.py and rootfs/staticinit.py hash it with their source. */
#ifndef GUESTINIT_INIT_COMMON_H
#define GUESTINIT_INIT_COMMON_H

#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

/* The seed CPython's str/bytes hash gets; ``fallback`` while the CRNG is not ready yet
 * (getrandom would block): the seed only spreads dict and set buckets, guestinit does not
 * rely on it for security (docs/guest.md). */
static inline uint32_t init_hash_seed(uint32_t fallback)
{
    uint32_t seed = 0;
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) == (ssize_t)sizeof seed && seed != 0)
        return seed; /* 0 would mean "no randomisation" to CPython */
    return fallback;
}

static inline void init_put(int fd, const char *s)
{
    if (fd >= 0 && write(fd, s, strlen(s)) < 0)
        return; /* nowhere left to report to */
}

/* ``line`` ("<2>..." with its newline) on stderr without the level prefix and, as PID 1,
 * in the kernel log at ``kmsg`` (the console may be gone). */
static inline void init_report(const char *line, int pid1, const char *kmsg)
{
    init_put(2, line + 3);
    if (!pid1)
        return; /* a test run: the host's kernel log is not ours */
    if (access(kmsg, W_OK) != 0) {
        /* the initramfs may have an empty /dev */
        mkdir("/dev", 0755);
        mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    }
    int fd = open(kmsg, O_WRONLY | O_CLOEXEC);
    init_put(fd, line);
    if (fd >= 0)
        close(fd);
}

/* PID 1 must not exit (the kernel panics): power off and wait for the VMM. */
static inline void init_power_off(void)
{
    sync();
    reboot(RB_POWER_OFF);
    for (;;)
        pause();
}

#endif
