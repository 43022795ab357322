"""What a suite.json becomes: a Markdown table for a PR, OpenMetrics, and charts.

Every renderer takes the suite dict (as ``bench.suite_schema.load_suite`` returns it)
and nothing else, so ``guestinit-bench report`` can redo any of them from the file.
The charts are in bench/suite_charts.py (matplotlib is imported only for them).
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.stats import ok_runs

DASH = "—"
EN_DASH = "\u2013"  # in ranges (min to max)
PROM_PREFIX = "guestinit_bench"
QUANTILES = (("0.0", "min"), ("0.25", "q1"), ("0.5", "median"), ("0.75", "q3"),
             ("1.0", "max"))
TOP_INITCALLS = 10


def _s(value: float | None, digits: int = 3) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _ms(value: float | None) -> str:
    return DASH if value is None else f"{value * 1e3:.1f}"


def _iqr(stats: Mapping[str, Any]) -> float | None:
    if stats.get("q1") is None or stats.get("q3") is None:
        return None
    return float(stats["q3"] - stats["q1"])


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{value * 100:.1f}%"


def _metric_median(variant: Mapping[str, Any], metric: str) -> float | None:
    stats = variant.get("metrics", {}).get(metric)
    return None if stats is None else stats.get("median")


class Goal(enum.StrEnum):
    AT_MOST = "<="   # P2: guestinit's ready time at most 1.15x busybox's
    AT_LEAST = ">="  # P3: systemd's userspace at least 3x guestinit's


def ratio_goal(key: str, ratio: Mapping[str, Any]) -> Goal:
    """The ratio's optional ``pass_if``; without it P3 ratios are at-least, others at-most."""
    if "pass_if" in ratio:
        return Goal(ratio["pass_if"])
    return Goal.AT_LEAST if key.startswith("p3_") else Goal.AT_MOST


def ratio_verdict(key: str, ratio: Mapping[str, Any]) -> str:
    """PASS, MISS, or NO DATA (a side without an OK run)."""
    value = ratio.get("value")
    if value is None:
        return "NO DATA"
    goal = ratio_goal(key, ratio)
    met = value <= ratio["target"] if goal is Goal.AT_MOST else value >= ratio["target"]
    return "PASS" if met else "MISS"


def machine_line(machine: Mapping[str, Any]) -> str:
    return (f"{machine['cpu_model']}, {machine['cores']} cores, accel {machine['accel']}, "
            f"-cpu {machine['cpu']}, entropy {machine['entropy']}, {machine['qemu_version']}, "
            f"guest kernel {machine['guest_kernel']}")


def _variant_rows(doc: Mapping[str, Any]) -> list[str]:
    head = (f"| variant | init | root | ready median s | IQR s | IQR/median | min{EN_DASH}max s "
            "| runs ok/failed | VMM + firmware median s | Run /init median s "
            "| userspace median s | first frame median s |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for name, v in doc["variants"].items():
        r = v["ready_s"]
        span = DASH if r["min"] is None else f"{r['min']:.3f}{EN_DASH}{r['max']:.3f}"
        rows.append(
            f"| {name} | {v['init']} | {v['root']} | {_s(r['median'])} | {_s(_iqr(r))} "
            f"| {_pct(r.get('iqr_rel'))} | {span} | {v['n_ok']}/{v['n_failed']} "
            f"| {_s(_metric_median(v, 'kernel_offset_s'))} "
            f"| {_s(_metric_median(v, 'guest_run_init_s'))} "
            f"| {_s(_metric_median(v, 'userspace_s'))} "
            f"| {_s(_metric_median(v, 'guest_first_frame_s'))} |")
    return rows


def _ratio_rows(doc: Mapping[str, Any]) -> list[str]:
    if not doc["ratios"]:
        return []
    rows = ["", "| ratio | variant / baseline | value | target | result |",
            "|---|---|---|---|---|"]
    for key, ratio in doc["ratios"].items():
        value = ratio.get("value")
        rows.append(f"| {key} | {ratio['variant']} / {ratio['baseline']} "
                    f"| {DASH if value is None else f'{value:.2f}'} "
                    f"| {ratio_goal(key, ratio)} {ratio['target']:g} "
                    f"| {ratio_verdict(key, ratio)} |")
    return rows


# Run /init is kernel time: one kernel and image boot to it within a few per cent, so a
# variant whose slowest run reached it this much later than its fastest saw the host
# change speed between boots (docs/bench.md, "suite")
HOST_SPEED_SPREAD = 1.2


def _host_speed_rows(doc: Mapping[str, Any]) -> list[str]:
    """A warning naming the variants whose Run /init spread says the host changed speed."""
    spread = []
    for name, v in doc["variants"].items():
        times = [t for t in (r.get("guest_run_init_s") for r in ok_runs(v)) if t]
        if len(times) > 1 and max(times) > HOST_SPEED_SPREAD * min(times):
            spread.append(f"{name} {min(times):.3f}\u2013{max(times):.3f} s")
    if not spread:
        return []
    return ["", f"Host speed: Run /init (kernel time) varied within a variant "
            f"({', '.join(spread)}): the host changed speed between boots. Compare userspace, "
            "or rerun."]


def _stage_rows(doc: Mapping[str, Any]) -> list[str]:
    names = [n for n, v in doc["variants"].items() if v["init"] == "guestinit" and v["stages"]]
    if not names:
        return []
    stages: dict[str, None] = {}
    for n in names:
        stages.update(dict.fromkeys(doc["variants"][n]["stages"]))
    rows = ["", "Stage medians, ms (guest clock):", "",
            "| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for stage in stages:
        cells = [_ms(doc["variants"][n]["stages"].get(stage, {}).get("median")) for n in names]
        rows.append(f"| {stage} | " + " | ".join(cells) + " |")
    return rows


def initcall_medians(variant: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Median µs per initcall over the OK runs that list it, slowest first."""
    per_name: dict[str, list[float]] = {}
    for run in ok_runs(variant):
        for call in run.get("initcalls", []):
            per_name.setdefault(call["name"], []).append(float(call["usecs"]))
    medians = [(name, statistics.median(us)) for name, us in per_name.items()]
    return sorted(medians, key=lambda item: (-item[1], item[0]))[:TOP_INITCALLS]


def _initcall_rows(doc: Mapping[str, Any]) -> list[str]:
    rows: list[str] = []
    for name, v in doc["variants"].items():
        calls = initcall_medians(v)
        if calls:
            rows += ["", f"Top initcalls, {name} (median ms):", ""]
            rows += [f"- {call}: {us / 1e3:.1f}" for call, us in calls]
    return rows


def _failure_rows(doc: Mapping[str, Any]) -> list[str]:
    failures = [(name, f) for name, v in doc["variants"].items() for f in v["failures"]]
    if not failures:
        return []
    return ["", "Failures:", ""] + [f"- {name} run {f['run']}: {f['reason']}"
                                    for name, f in failures]


def markdown(doc: Mapping[str, Any]) -> str:
    """The PR table: variants, ratios, machine, failures, stages, initcalls."""
    s = doc["settings"]
    out = [f"## guestinit-bench suite: {doc['machine']['name']} ({doc['created']})", "",
           f"{s['runs']} runs per variant after {s['warmup']} warm-up, order {s['order']}; "
           "times in seconds from QEMU spawn (host) unless marked guest.", ""]
    out += _variant_rows(doc)
    out += _ratio_rows(doc)
    out += _host_speed_rows(doc)
    out += ["", f"Machine: {machine_line(doc['machine'])}"]
    out += _failure_rows(doc)
    out += _stage_rows(doc)
    out += _initcall_rows(doc)
    return "\n".join(out) + "\n"


class SuiteCollector:
    """A prometheus_client collector over one suite dict (a registry renders it)."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.doc = doc

    def describe(self) -> list[Any]:
        return []  # unchecked collector: the families depend on the document

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
        from prometheus_client.samples import Sample

        doc = self.doc
        machine = doc["machine"]["name"]
        labels = ["variant", "machine"]
        ready = SummaryMetricFamily(f"{PROM_PREFIX}_ready_seconds",
                                    "QEMU spawn to the ready frame, over OK runs",
                                    labels=labels, unit="seconds")
        ok = GaugeMetricFamily(f"{PROM_PREFIX}_runs_ok", "measured runs that reached ready",
                               labels=labels)
        failed = GaugeMetricFamily(f"{PROM_PREFIX}_runs_failed", "measured runs that failed",
                                   labels=labels)
        metric = GaugeMetricFamily(f"{PROM_PREFIX}_metric_median_seconds",
                                   "median of a per-run metric over OK runs",
                                   labels=[*labels, "metric"], unit="seconds")
        stage = GaugeMetricFamily(f"{PROM_PREFIX}_stage_median_seconds",
                                  "median duration of a guestinit stage over OK runs",
                                  labels=[*labels, "stage"], unit="seconds")
        for name, v in doc["variants"].items():
            r = v["ready_s"]
            values = [x for x in (run.get("host_ready_s") for run in ok_runs(v)) if x is not None]
            if r["median"] is not None:
                for q, key in QUANTILES:
                    ready.samples.append(Sample(ready.name, {"variant": name, "machine": machine,
                                                             "quantile": q}, r[key]))
            ready.add_metric([name, machine], r["n_ok"], sum(values))
            ok.add_metric([name, machine], v["n_ok"])
            failed.add_metric([name, machine], v["n_failed"])
            for key, stats in v["metrics"].items():
                if stats["median"] is not None:
                    metric.add_metric([name, machine, key], stats["median"])
            for key, stats in v["stages"].items():
                if stats["median"] is not None:
                    stage.add_metric([name, machine, key], stats["median"])
        ratio = GaugeMetricFamily(f"{PROM_PREFIX}_ratio", "ratio of medians (see suite.md)",
                                  labels=["ratio", "variant", "baseline", "machine"])
        target = GaugeMetricFamily(f"{PROM_PREFIX}_ratio_target",
                                   "the ratio's target (the goal label says <= or >=)",
                                   labels=["ratio", "variant", "baseline", "machine", "goal"])
        for key, rt in doc["ratios"].items():
            lv = [key, rt["variant"], rt["baseline"], machine]
            if rt.get("value") is not None:
                ratio.add_metric(lv, rt["value"])
            target.add_metric([*lv, ratio_goal(key, rt).value], rt["target"])
        yield from (ready, ok, failed, metric, stage, ratio, target)


def exposition(collector: Any) -> str:
    """One collector's families as OpenMetrics text (ends with ``# EOF``)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.openmetrics.exposition import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text: bytes = generate_latest(registry)  # type: ignore[no-untyped-call]
    return text.decode("utf-8")


def openmetrics(doc: Mapping[str, Any]) -> str:
    """The suite as OpenMetrics text (ends with ``# EOF``)."""
    return exposition(SuiteCollector(doc))


def timeline_svg(doc: Mapping[str, Any], path: str | Path) -> Path:
    from bench.suite_charts import timeline
    return timeline(doc, Path(path))


def timeline_png(doc: Mapping[str, Any], path: str | Path) -> Path:
    from bench.suite_charts import timeline
    return timeline(doc, Path(path))


def distribution_svg(doc: Mapping[str, Any], path: str | Path) -> Path:
    from bench.suite_charts import distribution
    return distribution(doc, Path(path))


OUTPUTS = ("suite.md", "timeline.svg", "timeline.png", "distribution.svg", "suite.prom")


def write_all(doc: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """Every rendering of ``doc`` into ``directory`` (OUTPUTS); suite.json is not touched."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "suite.md").write_text(markdown(doc), encoding="utf-8")
    timeline_svg(doc, d / "timeline.svg")
    timeline_png(doc, d / "timeline.png")
    distribution_svg(doc, d / "distribution.svg")
    (d / "suite.prom").write_text(openmetrics(doc), encoding="utf-8")
    return [d / name for name in OUTPUTS]
