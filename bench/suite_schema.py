"""Reading a suite.json: the file, its JSON, its schema version, then the schema.

The schema (bench/data/suite.schema.json) is the contract of docs/bench.md in JSON
Schema draft 2020-12; everything that renders or compares suites reads through
``load_suite`` so a bad input fails once, here, naming the file and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SUITE_FILE = "suite.json"
SCHEMA_PATH = Path(__file__).parent / "data" / "suite.schema.json"
# What makes two suites comparable: the same host CPU, VMM, guest kernel and entropy.
MACHINE_KEYS = ("cpu_model", "cores", "accel", "cpu", "entropy", "qemu_version",
                "guest_kernel")


class SuiteError(Exception):
    """A suite.json that cannot be used; the message names the file and why."""


def suite_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/suite.json`` when it is a result directory."""
    p = Path(path)
    return p / SUITE_FILE if p.is_dir() else p


def schema() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return doc


def schema_problem(doc: object) -> str | None:
    """What is wrong with ``doc`` against the schema (the most relevant error), or None."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    if isinstance(doc, dict) and "schema" in doc and doc["schema"] != SCHEMA_VERSION:
        return (f"schema version {doc['schema']!r}; this guestinit-bench reads version "
                f"{SCHEMA_VERSION}")
    error = best_match(Draft202012Validator(schema()).iter_errors(doc))
    if error is None:
        return None
    return f"schema mismatch at {error.json_path}: {error.message}"


def validate(doc: object, where: str = "suite") -> dict[str, Any]:
    """``doc`` if it is a valid suite; SuiteError naming ``where`` otherwise."""
    problem = schema_problem(doc)
    if problem is not None:
        raise SuiteError(f"{where}: {problem}")
    assert isinstance(doc, dict)
    return doc


def load_suite(path: str | Path) -> dict[str, Any]:
    """The validated suite of a result directory or a suite.json file."""
    file = suite_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        what = "no such file" if file != Path(path) else "no such file or directory"
        raise SuiteError(f"{file}: {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{file}: cannot read: {exc}") from None
    if not text.strip():
        raise SuiteError(f"{file}: empty file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SuiteError(f"{file}: not JSON (truncated?): {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    return validate(doc, str(file))


def machine_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The MACHINE_KEYS on which two suites' machines differ, in MACHINE_KEYS order."""
    return [k for k in MACHINE_KEYS if old["machine"].get(k) != new["machine"].get(k)]
