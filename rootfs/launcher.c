/* /sbin/init (and /init) of a guestinit image: start the Python init with a hash seed.
 *
 * CPython seeds its str/bytes hash with getrandom() at start-up, and that read blocks
 * until the kernel CRNG is ready: about 1 s after /init under QEMU TCG without RDRAND or
 * virtio-rng. A PYTHONHASHSEED in the environment skips the read, but `python -I`
 * ignores the environment. So this launcher builds a fresh environment (the kernel hands
 * init every cmdline word it does not know as a variable; none of them may reach Python),
 * picks the seed without blocking and execs the interpreter with the flags -I stands for
 * except -E. Built by rootfs/launcher.py (gcc -static); docs/guest.md, "How it runs".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <unistd.h>

#include "init_common.h"

/* Compile-time settings (-D), so tests can point a build at a fake interpreter. */
#ifndef LAUNCHER_PYTHON
#define LAUNCHER_PYTHON "/usr/bin/python3.11"
#endif
#ifndef LAUNCHER_SITE
#define LAUNCHER_SITE "/usr/lib/guestinit"
#endif
/* The entry code. When guestinit itself cannot be imported (a module missing from the
 * image), no frame can be sent; it says what is missing on stderr (the console) and,
 * as PID 1, in the kernel log when /dev/kmsg exists, and powers off through ctypes, so
 * that the kernel does not panic on a dead init. */
#ifndef LAUNCHER_CODE
#define LAUNCHER_CODE \
    "import sys\n" \
    "sys.path.insert(0, \"" LAUNCHER_SITE "\")\n" \
    "try:\n" \
    "    from guestinit.__main__ import main\n" \
    "except BaseException as exc:\n" \
    "    import posix\n" \
    "    why = ('guestinit: cannot start: %s: %s (the image lacks part of guestinit or its '\n" \
    "           'Python modules); powering off\\n' % (type(exc).__name__, exc))\n" \
    "    sys.stderr.write(why)\n" \
    "    sys.stderr.flush()\n" \
    "    if posix.getpid() == 1:\n" \
    "        try:\n" \
    "            with open('/dev/kmsg', 'w') as kmsg:\n" \
    "                kmsg.write('<2>' + why)\n" \
    "        except OSError:\n" \
    "            pass\n" \
    "        try:\n" \
    "            import ctypes\n" \
    "            libc = ctypes.CDLL(None)\n" \
    "            libc.sync()\n" \
    "            libc.reboot(0x4321FEDC)\n" \
    "        except BaseException:\n" \
    "            pass\n" \
    "    raise SystemExit(1)\n" \
    "main()\n"
#endif
/* Used while the CRNG is not ready yet (getrandom would block): the seed only spreads
 * dict and set buckets, guestinit does not rely on it for security (docs/guest.md). */
#ifndef LAUNCHER_FALLBACK_SEED
#define LAUNCHER_FALLBACK_SEED 1103515245u
#endif
#ifndef LAUNCHER_KMSG
#define LAUNCHER_KMSG "/dev/kmsg"
#endif

/* Variables with this prefix are guestinit's own (GUESTINIT_SPANS carries the
 * initramfs timeline across the verity root's re-exec); everything else is dropped. */
#define KEEP_PREFIX "GUESTINIT_"

extern char **environ;

/* "PYTHONHASHSEED=<decimal>" into buf (no stdio: keeps the static binary small). */
static void seed_var(char *buf, size_t size, uint32_t seed)
{
    static const char name[] = "PYTHONHASHSEED=";
    char digits[16];
    size_t n = 0, len = sizeof name - 1;
    do {
        digits[n++] = (char)('0' + seed % 10);
        seed /= 10;
    } while (seed != 0);
    memcpy(buf, name, len);
    while (n > 0 && len + 1 < size)
        buf[len++] = digits[--n];
    buf[len] = '\0';
}

static void fail(const char *path, int err)
{
    int pid1 = getpid() == 1;
    char line[512] = "<2>guestinit-launcher: exec ";
    strncat(line, path, 256);
    strcat(line, ": ");
    strncat(line, strerror(err), 128);
    strcat(line, pid1 ? "; powering off\n" : "; exit 127\n");
    init_report(line, pid1, LAUNCHER_KMSG);
    if (!pid1)
        _exit(127);
    init_power_off();
}

int main(int argc, char **argv)
{
    size_t kept = 0, prefix = sizeof KEEP_PREFIX - 1;
    for (char **e = environ; *e; e++)
        kept += strncmp(*e, KEEP_PREFIX, prefix) == 0;
    char seed[32];
    seed_var(seed, sizeof seed, init_hash_seed(LAUNCHER_FALLBACK_SEED));
    char *env[kept + 2];
    size_t n = 0;
    env[n++] = seed;
    for (char **e = environ; *e && n < kept + 1; e++)
        if (strncmp(*e, KEEP_PREFIX, prefix) == 0)
            env[n++] = *e;
    env[n] = NULL;

    /* -I is -E -P -s; -E would drop PYTHONHASHSEED, and the environment is clean anyway.
     * -S: no site; -B: PID 1 never writes pycs (they are shipped, unchecked-hash). */
    char *args[argc + 8];
    size_t a = 0;
    args[a++] = LAUNCHER_PYTHON;
    args[a++] = "-s";
    args[a++] = "-S";
    args[a++] = "-P";
    args[a++] = "-B";
    args[a++] = "-c";
    args[a++] = LAUNCHER_CODE;
    for (int i = 1; i < argc; i++)
        args[a++] = argv[i]; /* the kernel's extra cmdline words; --root/--cmdline in tests */
    args[a] = NULL;

    execve(LAUNCHER_PYTHON, args, env);
    fail(LAUNCHER_PYTHON, errno);
    return 127;
}
