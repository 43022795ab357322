"""The modules a cpu boot imports, exec -> ready, are exactly docs/guest.md's table.

The real init runs as PID 1 of a namespace under ``-X importtime`` the way the image
starts it (``python3 -I -S``, explicit sys.path), with the agent stand-in behind
``agent.ready=unix:``; everything it imports before the ``ready`` frame, less what a
bare ``python3 -I -S -c pass`` imports, must be a row of the table, and every row must
still be imported. ``python -m tests.pidns.test_import_budget [RUNS]`` measures and
prints the rows (median self / cumulative us over RUNS boots).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from guestinit.wire import FrameType
from tests.pidns.harness import ROOT_TOKEN, NsInit, agent_arg, image_launch

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "guest.md"
ROW = re.compile(r"^\| `([\w.]+)` \|")
CMDLINE = (agent_arg("--listen", f"{ROOT_TOKEN}/run/agent.sock")
           + " guestinit.agent.ready=unix:/run/agent.sock guestinit.mode=cpu")


def table_modules(doc: str) -> list[str]:
    """Module names of the import table (rows of the "Import budget" section)."""
    section = doc.split("## Import budget", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for line in section.splitlines() if (m := ROW.match(line))]


def importtime(stderr: str) -> dict[str, tuple[int, int]]:
    """module -> (self us, cumulative us) from ``-X importtime`` lines."""
    out = {}
    for line in stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[0].strip().isdigit():
            out[parts[2].strip()] = (int(parts[0]), int(parts[1]))
    return out


def baseline() -> set[str]:
    proc = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c", "pass"],
                          capture_output=True, text=True, check=True)
    return set(importtime(proc.stderr))


def boot_imports(tmp: Path) -> dict[str, tuple[int, int]]:
    """What one cpu boot imported before its ready frame (the init's log holds stderr)."""
    init = NsInit(tmp, CMDLINE, launch=image_launch(python_args=("-X", "importtime")))
    try:
        init.wait_frame(FrameType.READY)
        return importtime(init.log_path.read_text(errors="replace"))
    finally:
        init.close()


def test_boot_imports_match_the_table(ns_init: type[NsInit], tmp_path: Path) -> None:
    init = ns_init(tmp_path, CMDLINE, launch=image_launch(python_args=("-X", "importtime")))
    init.wait_frame(FrameType.READY)
    seen = set(importtime(init.log_path.read_text(errors="replace"))) - baseline()
    listed = set(table_modules(DOC.read_text()))
    assert listed, "no import table in docs/guest.md"
    assert not seen - listed, (f"the boot imports {sorted(seen - listed)}, not in the import "
                               "table of docs/guest.md: avoid them, or measure and add rows")
    assert not listed - seen, (f"docs/guest.md's import table lists {sorted(listed - seen)}, "
                               "which the boot no longer imports: remove the rows")


def main(runs: int) -> None:
    base = baseline()
    samples: dict[str, list[tuple[int, int]]] = {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            for name, times in boot_imports(Path(tmp)).items():
                if name not in base:
                    samples.setdefault(name, []).append(times)
    for name, got in sorted(samples.items(), key=lambda kv: -statistics.median(
            t[0] for t in kv[1])):
        self_us = statistics.median(t[0] for t in got)
        cum_us = statistics.median(t[1] for t in got)
        print(f"| `{name}` | {self_us:.0f} | {cum_us:.0f} | {len(got)}/{runs} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
