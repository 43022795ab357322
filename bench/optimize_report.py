"""What ``guestinit-bench optimize`` writes: optimize.json (schema), optimize.md, the chart.

``document`` turns the optimizer's decisions into the JSON document
(bench/data/optimize.schema.json); every renderer reads that document and nothing
else. The per-phase suite documents are written by the command itself, in the suite's
format, so ``report`` and ``compare`` work on them.
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.optimize import (
    BASE_APPEND,
    Candidate,
    Composition,
    Decision,
    Kind,
    OptimizeError,
    Plan,
)
from bench.stats import metric_values
from bench.suite_report import DASH, machine_line

SCHEMA_VERSION = 1
KIND = "guestinit-bench-optimize"
SCHEMA_PATH = Path(__file__).parent / "data" / "optimize.schema.json"
OUTPUTS = ("optimize.json", "optimize.md", "optimize.svg", "optimize.png")


def schema_problem(doc: object) -> str | None:
    """What is wrong with ``doc`` against optimize.schema.json (the most relevant error)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    error = best_match(Draft202012Validator(schema).iter_errors(doc))
    return None if error is None else f"schema mismatch at {error.json_path}: {error.message}"


def validate(doc: object, where: str = "optimize") -> dict[str, Any]:
    problem = schema_problem(doc)
    if problem is not None:
        raise OptimizeError(f"{where}: {problem}")
    assert isinstance(doc, dict)
    return doc


def load(path: str | Path) -> dict[str, Any]:
    """The validated optimize.json of a result directory (or the file itself)."""
    p = Path(path)
    file = p / "optimize.json" if p.is_dir() else p
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OptimizeError(f"{file}: cannot read: {exc}") from None
    return validate(doc, str(file))


# -- the document ------------------------------------------------------------------

def measured(d: Decision) -> dict[str, Any]:
    c = d.change
    return {"n_ok": d.n_ok, "n_failed": d.n_failed, "base_median": d.base_median,
            "median": d.median, "change": c.change if c else None,
            "ci_low": c.ci_low if c else None, "ci_high": c.ci_high if c else None,
            "verdict": c.verdict.value if c else None, "note": c.note if c else "",
            "accepted": d.accepted, "reason": d.reason}


def candidate_row(c: Candidate, plan: Plan, d: Decision) -> dict[str, Any]:
    directory = c.directory if c.kind is Kind.IMAGE and c.directory else plan.base_dir
    return {"name": c.name, "kind": c.kind.value, "spec": c.spec, "words": list(c.words),
            "image": directory, "root": "erofs" if c.kind is Kind.EROFS else "initramfs",
            **measured(d)}


def cmdline_of(base_cmdline: str, words: Sequence[str]) -> str:
    """The recommended cmdline: the base's words, then the accepted ones not already there."""
    base = base_cmdline.split()
    return " ".join([*base, *(w for w in words if w not in base)])


def composition_row(comp: Composition, plan: Plan, d: Decision) -> dict[str, Any]:
    return {"candidates": list(comp.candidates), "words": list(comp.words),
            "image": comp.directory, "image_from": comp.image_from,
            "root": "erofs" if comp.erofs else "initramfs", "notes": list(comp.notes),
            "cmdline": cmdline_of(plan.base_cmdline, comp.words), **measured(d)}


def recommend(plan: Plan, comp: Composition | None, confirmed: Decision | None,
              why_not: str) -> dict[str, Any]:
    """The composition when phase 2 confirmed it faster than the base; the base otherwise."""
    if comp is not None and confirmed is not None and confirmed.accepted:
        return {"image": comp.directory, "root": "erofs" if comp.erofs else "initramfs",
                "cmdline": cmdline_of(plan.base_cmdline, comp.words),
                "candidates": list(comp.candidates),
                "why": "the composition is faster than the base beyond the noise (phase 2)"}
    if confirmed is not None:
        why_not = ("keep the base: the composition was not confirmed in phase 2 "
                   f"({confirmed.reason})")
    return {"image": plan.base_dir, "root": "initramfs", "cmdline": plan.base_cmdline,
            "candidates": [], "why": why_not}


def document(*, plan: Plan, decisions: Mapping[str, Decision], base: Mapping[str, Any],
             cmdline_from: str, machine: Mapping[str, Any], settings: Mapping[str, Any],
             command: Sequence[str], comp: Composition | None, confirmed: Decision | None,
             why_not: str, phases: Mapping[str, str | None]) -> dict[str, Any]:
    """optimize.json. ``base`` is the phase-1 suite entry of the base; ``confirmed`` the
    phase-2 decision on the composition (None: no phase 2, ``why_not`` says why)."""
    runs = base["runs"]
    failures = [r["reason"] for r in runs if not r["ok"]]
    values = metric_values(base, str(settings["metric"]))
    median = statistics.median(values) if values else None
    doc = {
        "schema": SCHEMA_VERSION, "kind": KIND,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": list(command), "machine": dict(machine), "settings": dict(settings),
        "base": {"image": plan.base_dir, "root": "initramfs", "cmdline": plan.base_cmdline,
                 "cmdline_from": cmdline_from, "append": BASE_APPEND,
                 "n_ok": base["n_ok"], "n_failed": base["n_failed"], "median": median,
                 "failure": failures[0] if failures else None},
        "candidates": [candidate_row(c, plan, decisions[c.name]) for c in plan.candidates],
        "composition": (composition_row(comp, plan, confirmed)
                        if comp is not None and confirmed is not None else None),
        "recommended": recommend(plan, comp, confirmed, why_not),
        "phases": dict(phases),
    }
    return validate(doc)


# -- Markdown ----------------------------------------------------------------------

def _s(value: float | None) -> str:
    return DASH if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:+.1f}%"


def _ci(row: Mapping[str, Any]) -> str:
    if row["ci_low"] is None or row["ci_high"] is None:
        return DASH
    return f"[{_pct(row['ci_low'])}, {_pct(row['ci_high'])}]"


def _verdict(row: Mapping[str, Any]) -> str:
    return DASH if row["verdict"] is None else str(row["verdict"]).upper()


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(doc: Mapping[str, Any]) -> str:
    s, base = doc["settings"], doc["base"]
    out = [f"## guestinit-bench optimize: {doc['machine']['name']} ({doc['created']})", "",
           f"Metric `{s['metric']}`, {s['runs']} runs per variant after {s['warmup']} warm-up, "
           f"interleaved; a candidate is accepted when it is faster than the base beyond "
           f"the noise (compare's verdict IMPROVEMENT: median change below "
           f"-{s['threshold'] * 100:g}% with the 95% interval below 0; changes under "
           f"{s['floor_s'] * 1000:g} ms are no change) and none of its runs failed.", "",
           f"Base: `{base['image']}` (initramfs), cmdline ({base['cmdline_from']}): "
           f"`{base['cmdline'] or '(empty)'}`; {base['n_ok']} OK / {base['n_failed']} failed, "
           f"median {_s(base['median'])} s"
           + (f"; first failure: {base['failure']}" if base["failure"] else ""), "",
           "| candidate | kind | spec | base median s | candidate median s | change "
           "| 95% interval | verdict | runs ok/failed | decision |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["candidates"]:
        decision = ("**accepted**" if r["accepted"] else "rejected") + f": {r['reason']}"
        out.append(f"| {_cell(r['name'])} | {r['kind']} | `{_cell(r['spec'])}` "
                   f"| {_s(r['base_median'])} | {_s(r['median'])} | {_pct(r['change'])} "
                   f"| {_ci(r)} | {_verdict(r)} | {r['n_ok']}/{r['n_failed']} "
                   f"| {_cell(decision)} |")
    out += ["", "### Composition", ""]
    comp = doc["composition"]
    if comp is None:
        out.append(f"Not measured: {doc['recommended']['why']}.")
    else:
        state = "confirmed" if comp["accepted"] else "not confirmed"
        out += [f"Accepted candidates together: {', '.join(comp['candidates'])}; root "
                f"{comp['root']}, image `{comp['image']}`, measured against the base in a "
                "second interleaved phase:", "",
                "| | base median s | composed median s | change | 95% interval | verdict "
                "| runs ok/failed |", "|---|---|---|---|---|---|---|",
                f"| composed | {_s(comp['base_median'])} | {_s(comp['median'])} "
                f"| {_pct(comp['change'])} | {_ci(comp)} | {_verdict(comp)} "
                f"| {comp['n_ok']}/{comp['n_failed']} |", "",
                f"Composition {state}: {comp['reason']}."]
        out += [f"- {note}" for note in comp["notes"]]
    rec = doc["recommended"]
    out += ["", "### Recommended", "",
            f"- cmdline: `{rec['cmdline'] or '(empty)'}`",
            f"- image: `{rec['image']}`",
            f"- root: {rec['root']}",
            f"- candidates: {', '.join(rec['candidates']) or 'none'}",
            f"- why: {rec['why']}", "",
            f"Machine: {machine_line(doc['machine'])}", "",
            "Per-phase suites (guestinit-bench report/compare read them): "
            + ", ".join(f"`{p}`" for p in doc["phases"].values() if p)]
    return "\n".join(out) + "\n"


def write_all(doc: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """OUTPUTS into ``directory`` (the document is validated before anything is written)."""
    from bench.optimize_chart import changes

    validate(dict(doc))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "optimize.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    (d / "optimize.md").write_text(markdown(doc), encoding="utf-8")
    changes(doc, d / "optimize.svg")
    changes(doc, d / "optimize.png")
    return [d / name for name in OUTPUTS]
