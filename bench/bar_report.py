"""What a bar-sweep's ``bar_sweep`` section becomes: a Markdown table, a plot of boot
cost against BAR size (SVG and PNG) and OpenMetrics; beside the suite's own renderings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bench.suite_report import DASH, PROM_PREFIX, exposition, machine_line
from guestinit.sizes import format_size

OUTPUTS = ("bar-sweep.md", "bar-sweep.svg", "bar-sweep.png", "bar-sweep.prom")


def _med(stats: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    value = None if stats is None else stats.get("median")
    return DASH if value is None else f"{value * scale:.{digits}f}"


def _spread(stats: Mapping[str, Any]) -> str:
    rel = stats.get("iqr_rel")
    return DASH if rel is None else f"{rel * 100:.1f}%"


def _size(n: int | None) -> str:
    return DASH if n is None else format_size(n) if n else "0"


def markdown(doc: Mapping[str, Any]) -> str:
    sweep = doc["bar_sweep"]
    settings = doc["settings"]
    out = [f"# guestinit-bench bar-sweep: {doc['machine']['name']}", "",
           machine_line(doc["machine"]) + f", machine {sweep['machine_type']}, "
           f"phys-bits {sweep['phys_bits']}", "",
           f"Device: {sweep['device']} at {sweep['bdf']}. {settings['runs']} measured runs "
           f"per size after {settings['warmup']} warm-up round(s), interleaved. Ready is host "
           "seconds from QEMU spawn; PCI enumeration is the guest kernel's root bridge line "
           "to the last line of its bus scan; discover is guestinit's stage.", "",
           "| BAR | guest saw | PCI enum ms | discover ms | ready s | IQR/med | "
           "Run /init→ready s | QEMU peak RSS MiB | ok/failed |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in sweep["sizes"]:
        seen = ", ".join(_size(s) for s in row["guest_bar_bytes"]) or DASH
        ready = row["ready_s"]
        out.append(f"| {_size(row['bar_bytes'])} | {seen} | {_med(row['pci_enum_s'], 1e3, 1)} "
                   f"| {_med(row['discover_s'], 1e3, 1)} | {_med(ready)} | {_spread(ready)} | "
                   f"{_med(row['userspace_s'])} | {_med(row['qemu_peak_rss_mib'], 1, 0)} | "
                   f"{ready['n_ok']}/{ready['n_failed']} |")
    out += ["", "## Cost per 64 GiB of BAR (least-squares slope over the medians)", ""]
    for metric, label in (("ready_s", "ready"), ("pci_enum_s", "PCI enumeration"),
                          ("discover_s", "discover stage")):
        c = sweep["cost"].get(metric)
        out.append(f"- {label}: " + (DASH if c is None else
                   f"{c['per_64gib_s'] * 1e3:+.1f} ms per 64 GiB; largest size minus "
                   f"smallest {c['largest_minus_smallest_s'] * 1e3:+.1f} ms"))
    maps = [r for r in sweep["sizes"] if r.get("bar_map")]
    if maps:
        out += ["", "## bar-map in the guest (medians)", "",
                "| BAR | mmap ms | fault-in s/GiB (4 KiB) | 2 MiB ÷ 4 KiB touch | "
                "stream GiB/s | page tables per GiB |", "|---|---|---|---|---|---|"]
        for row in maps:
            m = row["bar_map"]
            out.append(f"| {_size(row['bar_bytes'])} | {_fmt(m, 'mmap_ns', 1e-6, 2)} | "
                       f"{_fmt(m, 'fault_in_per_gib_4k_ns', 1e-9, 3)} | "
                       f"{_fmt(m, 'ratio_2m_vs_4k', 1, 2)} | {_fmt(m, 'stream_gib_s', 1, 2)} | "
                       f"{_kib(m.get('pte_bytes_per_gib'))} |")
    if sweep["refused"]:
        out += ["", "## Sizes not booted", "", *(f"- {line}" for line in sweep["refused"])]
    return "\n".join(out) + "\n"


def _fmt(m: Mapping[str, Any], key: str, scale: float, digits: int) -> str:
    value = m.get(key)
    return DASH if value is None else f"{value * scale:.{digits}f}"


def _kib(value: float | None) -> str:
    return DASH if value is None else f"{value / 1024:.0f} KiB"


def chart(doc: Mapping[str, Any], path: Path) -> Path:
    """Median ready time (IQR bars) and PCI enumeration / discover per BAR size."""
    import matplotlib.pyplot as plt

    from bench.suite_charts import RC, gid, save

    rows = doc["bar_sweep"]["sizes"]
    xs = list(range(len(rows)))
    labels = [_size(r["bar_bytes"]) for r in rows]
    with plt.rc_context(RC):
        fig, (top, low) = plt.subplots(2, 1, figsize=(7.0, 6.0), sharex=True)
        for x, r in zip(xs, rows, strict=True):
            s = r["ready_s"]
            if s["median"] is None:
                top.text(x, 0, "failed", ha="center", color="red")
                continue
            top.errorbar([x], [s["median"]], yerr=[[s["median"] - s["q1"]],
                                                  [s["q3"] - s["median"]]],
                         fmt="o", capsize=4, color="C0", gid=gid("ready", labels[x]))
        top.set_ylabel("QEMU spawn to ready, s (median, IQR)")
        top.set_title(f"boot cost vs BAR size: {doc['machine']['name']}")
        top.grid(linewidth=0.3)
        for metric, label, colour in (("pci_enum_s", "kernel PCI enumeration", "C1"),
                                      ("discover_s", "guestinit discover stage", "C2")):
            ys = [r[metric]["median"] for r in rows]
            pts = [(x, y * 1e3) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                low.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                         color=colour, gid=gid("line", metric))
        low.set_ylabel("ms (median)")
        low.set_xlabel("BAR size (one ivshmem-plain BAR 2; 0 = no device)")
        low.set_xticks(xs, labels)
        low.grid(linewidth=0.3)
        low.legend(loc="upper left")
        fig.tight_layout()
        return save(fig, path)


class SweepCollector:
    """prometheus_client collector over the ``bar_sweep`` section."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.doc = doc

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        machine = self.doc["machine"]["name"]
        labels = ["bar_bytes", "machine"]
        families = {
            key: GaugeMetricFamily(f"{PROM_PREFIX}_bar_sweep_{name}", doc, labels=labels,
                                   unit=unit)
            for key, name, doc, unit in (
                ("ready_s", "ready_median_seconds", "median QEMU spawn to ready", "seconds"),
                ("pci_enum_s", "pci_enum_median_seconds", "median kernel PCI enumeration",
                 "seconds"),
                ("discover_s", "discover_median_seconds", "median guestinit discover stage",
                 "seconds"),
                ("qemu_peak_rss_mib", "qemu_peak_rss_median_bytes", "median QEMU peak RSS",
                 "bytes"),
            )}
        for row in self.doc["bar_sweep"]["sizes"]:
            lv = [str(row["bar_bytes"]), machine]
            for key, family in families.items():
                median = row[key]["median"]
                if median is not None:
                    scale = 1 << 20 if key == "qemu_peak_rss_mib" else 1
                    family.add_metric(lv, median * scale)
        yield from families.values()


def openmetrics(doc: Mapping[str, Any]) -> str:
    return exposition(SweepCollector(doc))


def write_all(doc: Mapping[str, Any], directory: str | Path) -> list[Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "bar-sweep.md").write_text(markdown(doc), encoding="utf-8")
    chart(doc, d / "bar-sweep.svg")
    chart(doc, d / "bar-sweep.png")
    (d / "bar-sweep.prom").write_text(openmetrics(doc), encoding="utf-8")
    return [d / name for name in OUTPUTS]
