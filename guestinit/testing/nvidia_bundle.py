"""Installs the fake NVIDIA driver bundle (``fake_nvidia.py``) into a root.

``install(root)`` copies the stand-in under each program's name into
``<root>/usr/bin`` (``#!/usr/bin/python3 -IS``, Debian's interpreter, as in the
image), writes the fabric manager config template and the ``etc/fake-nvidia``
directory the stand-ins find their root by, with an optional ``behaviour``.
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


def install(root: str | os.PathLike[str], bin_dir: str = "usr/bin",
            behaviour: Mapping[str, str] | None = None) -> list[pathlib.Path]:
    root = pathlib.Path(root)
    source = (HERE / "fake_nvidia.py").read_text()
    body = source.split("\n", 1)[1] if source.startswith("#!") else source
    target_dir = root / bin_dir.strip("/")
    target_dir.mkdir(parents=True, exist_ok=True)
    installed = []
    for name in PROGRAMS:
        path = target_dir / name
        path.write_text(f"#!{INTERPRETER}\n{body}")
        path.chmod(0o755)
        installed.append(path)
    state = root / "etc" / "fake-nvidia"
    state.mkdir(parents=True, exist_ok=True)
    (state / "behaviour").write_text(
        "".join(f"{k}={v}\n" for k, v in (behaviour or {}).items()))
    template = root / "usr/share/nvidia/nvswitch/fabricmanager.cfg"
    template.parent.mkdir(parents=True, exist_ok=True)
    template.write_text(FM_TEMPLATE)
    return installed


def calls(root: str | os.PathLike[str]) -> list[str]:
    """Every start of a stand-in so far: ``prog arg arg`` lines."""
    path = pathlib.Path(root, "etc", "fake-nvidia", "calls.log")
    return path.read_text().splitlines() if path.exists() else []
