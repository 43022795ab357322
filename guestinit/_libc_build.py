"""Generates guestinit/_libc_cffi.py (cffi out-of-line ABI mode).

The generated module needs only ``_cffi_backend`` at run time: no compiler, no
pycparser on the guest's boot path. Regenerate with
``python -m guestinit._libc_build``; a unit test checks the committed file is
current.
"""

from __future__ import annotations

import pathlib

CDEF = """
int mount(const char *source, const char *target, const char *filesystemtype,
          unsigned long mountflags, const void *data);
int umount2(const char *target, int flags);
int reboot(int cmd);
long syscall(long number, ...);
int sethostname(const char *name, size_t len);
int prctl(int option, unsigned long arg2, unsigned long arg3,
          unsigned long arg4, unsigned long arg5);
int ioctl(int fd, unsigned long request, void *argp);
void sync(void);
int inotify_init1(int flags);
int inotify_add_watch(int fd, const char *pathname, uint32_t mask);
int unshare(int flags);
struct rlimit { unsigned long rlim_cur; unsigned long rlim_max; };
int prlimit(int pid, int resource, const struct rlimit *new_limit, struct rlimit *old_limit);
"""


def builder() -> object:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("guestinit._libc_cffi", None)
    return ffi


def generate(target: pathlib.Path) -> None:
    ffi = builder()
    ffi.emit_python_code(str(target))  # type: ignore[attr-defined]


if __name__ == "__main__":
    generate(pathlib.Path(__file__).with_name("_libc_cffi.py"))
