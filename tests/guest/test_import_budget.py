"""The guest's boot path must stay cheap to import (STYLE.md: import cost is a budget)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from guestinit import _libc_build

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"dataclasses", "typing", "logging", "tomllib", "subprocess", "asyncio", "pycparser",
             "cffi", "pyudev", "elftools", "json",
             "traceback", "tokenize",  # traceback: only the crash path, and it does without
             "enum", "functools", "socket", "signal", "selectors"}  # see guestinit/choice.py
BOOT_PATH = ("guestinit.__main__", "guestinit.early", "guestinit.pid1", "guestinit.agent",
             "guestinit.syslog")


def test_boot_path_imports_nothing_heavy() -> None:
    import msgpack

    site = str(Path(msgpack.__file__).parents[1])  # like /usr/lib/guestinit in the image
    code = f"import sys; sys.path[:0] = [{str(REPO)!r}, {site!r}]; " + "; ".join(
        f"import {m}" for m in BOOT_PATH)
    proc = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c", code],
                          capture_output=True, text=True, check=True,
                          env={"PYTHONPATH": ""})
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    top_level = {name.split(".")[0] for name in imported}
    assert not (top_level & FORBIDDEN), f"boot path imports {sorted(top_level & FORBIDDEN)}"


def test_generated_cffi_module_is_current(tmp_path: Path) -> None:
    target = tmp_path / "gen.py"
    _libc_build.generate(target)
    def body(text: str) -> list[str]:
        # the _version line follows the cffi release that generated it
        return [line for line in text.splitlines() if "_version" not in line]
    assert body(target.read_text()) == body((REPO / "guestinit" / "_libc_cffi.py").read_text())
