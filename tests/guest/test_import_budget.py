"""The guest's boot path must stay cheap to import (STYLE.md: import cost is a budget).

The modules it may import are the rows of docs/guest.md's import table; the pid-namespace
tier (tests/pidns/test_import_budget.py) checks the table against a real boot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from guestinit import _libc_build
from tests.pidns.test_import_budget import DOC, table_modules

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"dataclasses", "typing", "logging", "tomllib", "subprocess", "asyncio", "pycparser",
             "cffi", "pyudev", "elftools", "json",
             "traceback", "tokenize",  # traceback: only the crash path, and it does without
             "enum", "functools", "socket", "signal", "selectors",  # see guestinit/choice.py
             "msgpack", "datetime", "collections"}  # see guestinit/msgpack_encode.py
# what a cpu boot imports, exec -> ready: __main__ at exec, then what its stages import
BOOT_PATH = ("guestinit.__main__", "guestinit._libc_cffi", "guestinit.syslog", "guestinit.discover",
             "guestinit.lockdown", "guestinit.powerbutton", "guestinit.control")


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
    bare = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c", "pass"],
                          capture_output=True, text=True, check=True).stderr
    base = {line.split("|")[-1].strip() for line in bare.splitlines() if "|" in line}
    extra = imported - base - set(table_modules(DOC.read_text())) - {"imported package"}
    assert not extra, (f"the boot path imports {sorted(extra)}, not in docs/guest.md's "
                       "import table: avoid them, or measure and add rows")


def test_table_parses() -> None:
    listed = table_modules(DOC.read_text())
    assert "guestinit.__main__" in listed and len(listed) == len(set(listed))
    assert not {m.split(".")[0] for m in listed} & FORBIDDEN


def test_generated_cffi_module_is_current(tmp_path: Path) -> None:
    target = tmp_path / "gen.py"
    _libc_build.generate(target)
    def body(text: str) -> list[str]:
        # the _version line follows the cffi release that generated it
        return [line for line in text.splitlines() if "_version" not in line]
    assert body(target.read_text()) == body((REPO / "guestinit" / "_libc_cffi.py").read_text())


def test_guestinit_never_takes_randomness_from_the_random_module() -> None:
    # The launcher's hash seed may be a fixed fallback (docs/guest.md, "How it runs"):
    # nothing may draw from ``random`` (seeded from it at import) or rely on hash order.
    import ast

    offenders = []
    for path in sorted((REPO / "guestinit").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "random" for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
