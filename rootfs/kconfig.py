"""Kernel config fragments (``kernel-config/*.conf``) and the checker.

A fragment is Kconfig syntax (``CONFIG_X=y``, ``# CONFIG_X is not set``) where the
comment lines just above an option say why it is there and may carry tags:

- ``[module: name]`` -- a ``=y`` wish that ``=m`` also satisfies, provided the
  image carries module ``name`` and the init loads it early;
- ``[optional]`` -- reported but never fails the check.

A fragment whose first line is ``# level: advisory`` makes all its options optional
(fast-boot and debug fragments: nice to have, not needed to boot).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from rootfs.steps import BuildError

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_MODULE_TAG = re.compile(r"\[module:\s*([A-Za-z0-9_-]+)\]")


class Status(StrEnum):
    OK = "ok"
    MODULE = "module"
    MISSING = "missing"
    WRONG = "wrong"


@dataclass(frozen=True)
class Want:
    option: str
    value: str  # "y", "m", "n" or a literal
    fragment: str
    why: str
    module: str | None
    required: bool


@dataclass(frozen=True)
class Result:
    want: Want
    found: str | None
    status: Status

    @property
    def fails(self) -> bool:
        return self.want.required and self.status in (Status.MISSING, Status.WRONG)


def parse_config(text: str) -> dict[str, str]:
    """A kernel ``.config``: option -> value (``n`` for ``is not set``), quotes kept."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _SET.match(line):
            out[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            out[m.group(1)] = "n"
    return out


def read_config(path: Path) -> dict[str, str]:
    try:
        return parse_config(path.read_text())
    except OSError as exc:
        raise BuildError(f"read kernel config {path}: {exc.strerror}") from None


def parse_fragment(text: str, name: str) -> list[Want]:
    lines = text.splitlines()
    advisory = bool(lines) and lines[0].strip() == "# level: advisory"
    wants: list[Want] = []
    comment: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        m = _SET.match(line) or _UNSET.match(line)
        if m:
            value = m.group(2) if m.re is _SET else "n"
            note = " ".join(comment)
            tag = _MODULE_TAG.search(note)
            why = _MODULE_TAG.sub("", note).replace("[optional]", "").strip()
            wants.append(Want(m.group(1), value, name, why, tag.group(1) if tag else None,
                              not advisory and "[optional]" not in note))
            comment = []
        elif line.startswith("#"):
            comment.append(line.lstrip("#").strip())
        elif not line:
            comment = []
        else:
            raise BuildError(f"kernel-config fragment {name}:{lineno}: expected CONFIG_X=value "
                             f"or a # comment, got {raw!r}")
    return wants


def read_fragment(path: Path) -> list[Want]:
    try:
        return parse_fragment(path.read_text(), path.name)
    except OSError as exc:
        raise BuildError(f"read kernel-config fragment {path}: {exc.strerror}") from None


def check(config: dict[str, str], wants: list[Want]) -> list[Result]:
    results = []
    for w in wants:
        found = config.get(w.option)
        if found == w.value or (found is None and w.value == "n"):
            status = Status.OK
        elif w.value == "y" and found == "m" and w.module is not None:
            status = Status.MODULE
        elif found is None or found == "n":
            status = Status.MISSING
        else:
            status = Status.WRONG
        results.append(Result(w, found, status))
    return results


def modules_needed(results: list[Result]) -> list[str]:
    """Modules the image must carry and load early: wishes satisfied by ``=m``."""
    out: list[str] = []
    for r in results:
        if r.status is Status.MODULE and r.want.module and r.want.module not in out:
            out.append(r.want.module)
    return out


def table(results: list[Result]) -> str:
    rows = [("option", "wanted", "found", "status", "fragment", "why")]
    for r in results:
        status = r.status.value + ("" if r.want.required or r.status is Status.OK
                                   or r.status is Status.MODULE else " (optional)")
        if r.status is Status.MODULE:
            status += f" {r.want.module}"
        rows.append((r.want.option, r.want.value, r.found or "-", status, r.want.fragment,
                     r.want.why[:60]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True))
                     + "  " + row[5] for row in rows)
