"""Installs the fake NVIDIA driver bundle (``fake_nvidia.py``) into a root.

``install(root)`` copies the stand-in's modules (``fake_nvidia``, ``fake_nvidia_runtime``,
``fake_nvidia_services``, as the package ``guestinit.testing``) under
``<root>/usr/lib/fake-nvidia`` and puts a launcher under each program's name into
``<root>/usr/bin`` (``#!/usr/bin/python3 -IS``, Debian's interpreter, as in the image:
``-I`` keeps the script's directory off ``sys.path``, so the launcher adds the modules'
directory, found relative to itself). It writes the fabric manager config template and
the ``etc/fake-nvidia`` directory the stand-ins find their root by, with an optional
``behaviour``. It also lays down what the CDI spec mounts and links: tiny stand-in
libraries ``usr/lib/x86_64-linux-gnu/lib*.so.<DRIVER_VERSION>`` (ELF objects with only a
DT_SONAME, ``elf_with_soname``) and ``usr/bin/nvidia-cdi-hook`` (exits 0). And
``libnvfm.so.1``, the Fabric Manager SDK's client library: its stand-in compiled with gcc
(``build_libnvfm``), which the image build links the partition service's binding to.
"""

from __future__ import annotations

import os
import pathlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

HERE = pathlib.Path(__file__).resolve().parent
PROGRAMS = ("nvidia-persistenced", "nvidia-smi", "nv-fabricmanager", "nvlsm", "nv-hostengine",
            "dcgm-exporter")
INTERPRETER = "/usr/bin/python3 -IS"
DRIVER_VERSION = "550.54.15"  # as tests/fixtures/standin_bundle.py's VERSION
LIBDIR = "usr/lib/x86_64-linux-gnu"
LIBRARIES = {"libcuda": "libcuda.so.1", "libnvidia-ml": "libnvidia-ml.so.1",
             "libnvidia-ptxjitcompiler": "libnvidia-ptxjitcompiler.so.1"}  # name -> soname
CDI_HOOK = "usr/bin/nvidia-cdi-hook"
NVFM = "libnvfm.so.1"  # the Fabric Manager SDK's client library (its stand-in, compiled)
FAKE_LIB = "usr/lib/fake-nvidia"
FAKE_MODULES = ("fake_nvidia", "fake_nvidia_runtime", "fake_nvidia_services", "fake_fabric")
FM_TEMPLATE = """\
# NVIDIA Fabric Manager configuration file (stand-in template)
LOG_LEVEL=4
LOG_FILE_NAME=/var/log/fabricmanager.log
LOG_APPEND_TO_LOG=1
LOG_USE_SYSLOG=0
DAEMONIZE=1
BIND_INTERFACE_IP=127.0.0.1
STARTING_TCP_PORT=16000
FABRIC_MODE=0
FABRIC_MODE_RESTART=0
STATE_FILE_NAME=/tmp/fabricmanager.state
PARTITION_RAIL_POLICY=greedy
"""


def elf_with_soname(soname: str) -> bytes:
    """The smallest x86_64 ELF shared object ldconfig would read ``soname`` from: an ELF
    header, one PT_LOAD over the whole file, one PT_DYNAMIC with DT_STRTAB, DT_STRSZ,
    DT_SONAME and DT_NULL, and the string table. No code, no section headers."""
    strtab = b"\0" + soname.encode() + b"\0"
    dyn_off = 64 + 2 * 56
    str_off = dyn_off + 4 * 16
    size = str_off + len(strtab)

    def q(*values: int) -> bytes:
        return b"".join(v.to_bytes(8, "little") for v in values)

    def phdr(kind: int, flags: int, offset: int, filesz: int, align: int) -> bytes:
        return (kind.to_bytes(4, "little") + flags.to_bytes(4, "little")
                + q(offset, offset, offset, filesz, filesz, align))

    header = (b"\x7fELF\x02\x01\x01" + bytes(9)
              + (3).to_bytes(2, "little") + (62).to_bytes(2, "little")  # ET_DYN, x86_64
              + (1).to_bytes(4, "little") + q(0, 64, 0) + bytes(4)  # entry, phoff, shoff
              + b"".join(v.to_bytes(2, "little") for v in (64, 56, 2, 64, 0, 0)))
    dynamic = q(5, str_off, 10, len(strtab), 14, 1, 0, 0)  # STRTAB, STRSZ, SONAME, NULL
    return (header + phdr(1, 4, 0, size, 0x1000) + phdr(2, 4, dyn_off, 4 * 16, 8)
            + dynamic + strtab)


def build_libnvfm(target: pathlib.Path, cc: str = "gcc") -> pathlib.Path:
    """The libnvfm stand-in (``libnvfm_standin.c``: the Fabric Manager SDK's client ABI,
    talking to ``fake_fabric``) compiled to ``target``, stripped and without a build id."""
    import subprocess

    header_dir = HERE.parent / "nvidia"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-s", "-Wl,--build-id=none",
                    f"-ffile-prefix-map={HERE}=.", f"-ffile-prefix-map={header_dir}=.",
                    f"-I{header_dir}", f"-Wl,-soname,{NVFM}", "-o", str(target),
                    str(HERE / "libnvfm_standin.c")], check=True, capture_output=True, text=True)
    return target


def install(root: str | os.PathLike[str], bin_dir: str = "usr/bin",
            behaviour: Mapping[str, str] | None = None) -> list[pathlib.Path]:
    root = pathlib.Path(root)
    lib = root / FAKE_LIB
    package = lib / "guestinit" / "testing"
    package.mkdir(parents=True, exist_ok=True)
    for init in (lib / "guestinit" / "__init__.py", package / "__init__.py"):
        init.write_text("")
    for module in FAKE_MODULES:
        (package / f"{module}.py").write_text((HERE / f"{module}.py").read_text())
    target_dir = root / bin_dir.strip("/")
    target_dir.mkdir(parents=True, exist_ok=True)
    # no __pycache__ beside the modules: the bundle is copied into images as it is
    launcher = (f"#!{INTERPRETER}\nimport os, sys\nsys.dont_write_bytecode = True\n"
                "sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "
                f"{os.path.relpath(lib, target_dir)!r}))\n"
                "from guestinit.testing.fake_nvidia import main\n"
                "sys.exit(main())\n")
    installed = []
    for name in PROGRAMS:
        path = target_dir / name
        path.write_text(launcher)
        path.chmod(0o755)
        installed.append(path)
    state = root / "etc" / "fake-nvidia"
    state.mkdir(parents=True, exist_ok=True)
    (state / "behaviour").write_text(
        "".join(f"{k}={v}\n" for k, v in (behaviour or {}).items()))
    template = root / "usr/share/nvidia/nvswitch/fabricmanager.cfg"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text(FM_TEMPLATE)
    libdir = root / LIBDIR
    libdir.mkdir(parents=True, exist_ok=True)
    for name, soname in LIBRARIES.items():
        (libdir / f"{name}.so.{DRIVER_VERSION}").write_bytes(elf_with_soname(soname))
    build_libnvfm(libdir / NVFM)
    hook = root / CDI_HOOK
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(f"#!{INTERPRETER}\nraise SystemExit(0)\n")
    hook.chmod(0o755)
    return installed


def calls(root: str | os.PathLike[str]) -> list[str]:
    """Every start of a stand-in so far: ``prog arg arg`` lines."""
    path = pathlib.Path(root, "etc", "fake-nvidia", "calls.log")
    return path.read_text().splitlines() if path.exists() else []
