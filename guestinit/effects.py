"""The one thin layer that changes the kernel's state.

Everything that mounts, loads a module, reboots, sets the hostname or writes a
control file goes through an ``Effects`` object, so plans can be tested against
a recording fake (``tests/guest/fakes.py``) and the real init passes ``Effects()``.
Each call raises ``OSError`` naming the object it acted on.
"""

from __future__ import annotations

import errno
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# <sys/mount.h>
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19
# <linux/sched.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MNT_DETACH = 2
RLIMIT_NOFILE = 7  # <asm-generic/resource.h>
RLIM_INFINITY = (1 << 64) - 1
# <linux/reboot.h>
RB_POWER_OFF = 0x4321FEDC
RB_DISABLE_CAD = 0
# <sys/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
# Syscall numbers glibc has no wrapper for, per ``uname -m`` (<asm/unistd.h>; aarch64
# uses the generic table, as do riscv64 and loongarch64).
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"finit_module": 313},
    "aarch64": {"finit_module": 273},
}


def syscall_number(name: str, machine: str | None = None) -> int:
    """``name``'s number on ``machine`` (default: this one); OSError(ENOSYS) if unknown."""
    arch = machine or os.uname().machine
    try:
        return SYSCALLS[arch][name]
    except KeyError:
        raise OSError(errno.ENOSYS, f"{name}: no syscall number known for {arch} "
                      f"(known: {', '.join(SYSCALLS)})") from None
# <linux/sockios.h>, <net/if.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def _limit(value: int) -> int:
    return -1 if value == RLIM_INFINITY else value


def _lib() -> tuple[object, object]:
    """cffi's API mode where the image's executable has it compiled in (_libc_build), else
    the ABI mode module over the process's libc (the launcher images, tests on the host)."""
    try:
        from _guestinit_libc import ffi, lib  # type: ignore[import-not-found]

        return ffi, lib
    except ImportError:
        from guestinit._libc_cffi import ffi

        return ffi, ffi.dlopen(None)


class Effects:
    """Real effects through libc (cffi: API mode in the image's executable, else ABI mode)."""

    __slots__ = ("_loaded",)

    def __init__(self) -> None:
        # loaded at the first call, inside the early stage: a missing _cffi_backend then
        # fails that stage with a failed frame instead of killing PID 1 before it starts
        self._loaded: tuple[object, object] | None = None

    def _binding(self) -> tuple[object, object]:
        if self._loaded is None:
            self._loaded = _lib()
        return self._loaded

    @property
    def _ffi(self) -> object:
        return self._binding()[0]

    @property
    def _lib(self) -> object:
        return self._binding()[1]

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            err = self._ffi.errno  # type: ignore[attr-defined]
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
        ffi = self._ffi
        rc = self._lib.mount(  # type: ignore[attr-defined]
            source.encode(), target.encode(), fstype.encode() if fstype else ffi.NULL,  # type: ignore[attr-defined]
            flags, data.encode() if data else ffi.NULL,  # type: ignore[attr-defined]
        )
        self._check(rc, f"mount {source} on {target} ({fstype or 'bind/remount'})")

    def umount(self, target: str, flags: int = 0) -> None:
        self._check(self._lib.umount2(target.encode(), flags), f"umount {target}")  # type: ignore[attr-defined]

    def reboot(self, cmd: int) -> None:
        self._check(self._lib.reboot(cmd), f"reboot {cmd:#x}")  # type: ignore[attr-defined]

    def finit_module(self, path: str, params: str = "") -> None:
        ffi = self._ffi
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            # syscall(2) is variadic: cffi wants every extra argument as typed cdata, and
            # the kernel reads each as a full register, hence long and char*.
            args = (ffi.cast("long", fd), ffi.new("char[]", params.encode()),  # type: ignore[attr-defined]
                    ffi.cast("long", 0))  # type: ignore[attr-defined]
            number = syscall_number("finit_module")
            rc = self._lib.syscall(number, *args)  # type: ignore[attr-defined]
            self._check(rc, f"finit_module {path}")
        finally:
            os.close(fd)

    def sethostname(self, name: str) -> None:
        raw = name.encode()
        self._check(self._lib.sethostname(raw, len(raw)), f"sethostname {name}")  # type: ignore[attr-defined]

    def set_child_subreaper(self) -> None:
        self._check(self._lib.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl child subreaper")  # type: ignore[attr-defined]

    def link_up(self, ifname: str) -> None:
        import _socket  # socket.py would import enum (boot path)
        import struct

        ffi = self._ffi
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            ifr = ffi.new("char[40]", ifname.encode()[:15])  # type: ignore[attr-defined]
            self._check(self._lib.ioctl(sock.fileno(), SIOCGIFFLAGS, ifr), f"get flags of {ifname}")  # type: ignore[attr-defined]
            (flags,) = struct.unpack_from("H", ffi.buffer(ifr), 16)  # type: ignore[attr-defined]
            ffi.buffer(ifr)[16:18] = struct.pack("H", flags | IFF_UP)  # type: ignore[attr-defined]
            self._check(self._lib.ioctl(sock.fileno(), SIOCSIFFLAGS, ifr), f"bring {ifname} up")  # type: ignore[attr-defined]
        finally:
            sock.close()

    def sync(self) -> None:
        self._lib.sync()  # type: ignore[attr-defined]

    def unshare(self, flags: int) -> None:
        self._check(self._lib.unshare(flags), f"unshare {flags:#x}")  # type: ignore[attr-defined]

    def nofile(self) -> tuple[int, int]:
        """This process's RLIMIT_NOFILE (soft, hard); RLIM_INFINITY as -1."""
        old = self._ffi.new("struct rlimit *")  # type: ignore[attr-defined]
        self._check(self._lib.prlimit(0, RLIMIT_NOFILE, self._ffi.NULL, old),  # type: ignore[attr-defined]
                    "getrlimit NOFILE")
        return _limit(old.rlim_cur), _limit(old.rlim_max)

    def set_nofile(self, soft: int, hard: int) -> None:
        """``setrlimit(RLIMIT_NOFILE)`` through libc's prlimit (the ``resource`` module is
        a shared library of its own to load: not on the boot path); -1 is RLIM_INFINITY."""
        limits = (soft % (RLIM_INFINITY + 1), hard % (RLIM_INFINITY + 1))
        new = self._ffi.new("struct rlimit *", limits)  # type: ignore[attr-defined]
        self._check(self._lib.prlimit(0, RLIMIT_NOFILE, new, self._ffi.NULL),  # type: ignore[attr-defined]
                    f"setrlimit NOFILE {soft}:{hard}")

    def kill_all(self, sig: int) -> None:
        """``kill(-1, sig)``: every process but PID 1 (of this PID namespace); only PID 1
        may, since from anywhere else it would signal every process of the user."""
        if os.getpid() != 1:
            raise OSError(errno.EPERM, f"kill(-1, {sig}): refused, this is not PID 1")
        try:
            os.kill(-1, sig)
        except ProcessLookupError:
            return  # nobody else is left

    def mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        try:
            os.mknod(path, mode, os.makedev(major, minor))
        except OSError as exc:
            raise OSError(exc.errno, f"mknod {path} ({major}:{minor}): {exc.strerror}") from None

    def chown_chmod(self, path: str, mode: int, uid: int, gid: int) -> None:
        """Owner and mode of a node we made (mknod's mode is cut by the umask)."""
        try:
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        except OSError as exc:
            raise OSError(exc.errno, f"chown/chmod {path}: {exc.strerror}") from None

    def write(self, path: str, text: str) -> None:
        """Write a control file (/proc/sys/..., /sys/...), naming it on error."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OSError(exc.errno, f"open {path}: {exc.strerror}") from None
        try:
            os.write(fd, text.encode())
        except OSError as exc:
            raise OSError(exc.errno, f"write {text!r} to {path}: {exc.strerror}") from None
        finally:
            os.close(fd)

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        os.makedirs(path, mode, exist_ok=True)

    def unlink(self, path: str) -> None:
        """Remove a node we made (a hot-removed GPU's)."""
        try:
            os.unlink(path)
        except OSError as exc:
            raise OSError(exc.errno, f"unlink {path}: {exc.strerror}") from None


class DryEffects(Effects):
    """Records what would be done instead of doing it; tests and `--dry-run`."""

    __slots__ = ("calls", "fail")

    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.fail = set(fail)

    def _do(self, name: str, *args: object) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise OSError(1, f"{name} {args[0] if args else ''}: injected failure")

    def mount(self, source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
        self._do("mount", source, target, fstype, flags, data)

    def umount(self, target: str, flags: int = 0) -> None:
        self._do("umount", target, flags)

    def reboot(self, cmd: int) -> None:
        self._do("reboot", cmd)

    def finit_module(self, path: str, params: str = "") -> None:
        self._do("finit_module", path, params)

    def sethostname(self, name: str) -> None:
        self._do("sethostname", name)

    def set_child_subreaper(self) -> None:
        self._do("set_child_subreaper")

    def link_up(self, ifname: str) -> None:
        self._do("link_up", ifname)

    def sync(self) -> None:
        self._do("sync")

    def nofile(self) -> tuple[int, int]:
        return Effects().nofile()  # reading is harmless: the test runner's own limit

    def set_nofile(self, soft: int, hard: int) -> None:
        self._do("set_nofile", soft, hard)

    def kill_all(self, sig: int) -> None:
        self._do("kill_all", sig)

    def mknod(self, path: str, mode: int, major: int, minor: int) -> None:
        self._do("mknod", path, mode, major, minor)

    def chown_chmod(self, path: str, mode: int, uid: int, gid: int) -> None:
        self._do("chown_chmod", path, mode, uid, gid)

    def write(self, path: str, text: str) -> None:
        self._do("write", path, text)

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        self._do("makedirs", path, mode)

    def unlink(self, path: str) -> None:
        self._do("unlink", path)

    def unshare(self, flags: int) -> None:
        self._do("unshare", flags)
