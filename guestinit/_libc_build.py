"""Generates guestinit/_libc_cffi.py (cffi out-of-line ABI mode) and, for the image's one
executable, the same declarations in cffi's API mode (C source, ``_guestinit_libc``).

The ABI-mode module needs only ``_cffi_backend`` at run time: no compiler, no
pycparser on the guest's boot path; it serves the launcher images and the tests on the
host. Regenerate it with ``python -m guestinit._libc_build``; a unit test checks the
committed file is current. The API-mode module is compiled ahead, at image build time, into
``/usr/bin/python3.11`` (rootfs/staticinit.py): C wrappers checked against libc's own
headers, no dlopen/dlsym and no libffi call per function (effects.py prefers it).
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


API_MODULE = "_guestinit_libc"  # top level: Python's BuiltinImporter finds no dotted names
# the headers that declare CDEF's functions and struct rlimit
API_HEADERS = "".join(f"#include <{h}>\n" for h in (
    "sys/mount.h", "sys/reboot.h", "unistd.h", "sys/prctl.h", "sys/ioctl.h", "sys/inotify.h",
    "sched.h", "sys/resource.h"))


def builder() -> object:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("guestinit._libc_cffi", None)
    return ffi


def api_c_code() -> str:
    """The C source of the API-mode module (needs cffi and pycparser: build time only)."""
    import contextlib
    import io
    import tempfile

    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(API_MODULE, API_HEADERS)
    with tempfile.TemporaryDirectory(prefix="guestinit-libc-") as tmp:
        path = pathlib.Path(tmp) / f"{API_MODULE}.c"
        with contextlib.redirect_stdout(io.StringIO()):  # its "generating PATH" line
            ffi.emit_c_code(str(path))
        return path.read_text()


def generate(target: pathlib.Path) -> None:
    ffi = builder()
    ffi.emit_python_code(str(target))  # type: ignore[attr-defined]


if __name__ == "__main__":
    generate(pathlib.Path(__file__).with_name("_libc_cffi.py"))
