"""A realistic suite.json document (contract schema 1) for the report and compare tests.

Three variants (guestinit, busybox, systemd), five measured runs each with spans,
stages (guestinit) and initcalls (guestinit); busybox's run 3 fails.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from bench.stats import summarize_variant

MACHINE: dict[str, Any] = {
    "name": "tcg-2c", "cpu_model": "Intel(R) Xeon(R) CPU @ 2.20GHz", "cores": 2,
    "memory_bytes": 25_000_000_000, "host_kernel": "6.1.0-27-amd64",
    "os": "Debian GNU/Linux 12 (bookworm)", "qemu_version": "QEMU emulator version 7.2.13",
    "machine_type": "microvm", "accel": "tcg", "cpu": "max", "entropy": "rdrand+virtio-rng",
    "guest_kernel": "6.1.0-27-amd64", "guest_memory_mib": 1024, "guest_cpus": 1,
}
JITTER = (0.0, 0.02, -0.01, 0.01, -0.02)  # per run, relative: medians are the base values
# guest seconds: "Run /init", first frame, stage durations (guestinit), ready
GUESTINIT_STAGES = (("early", 0.040), ("config", 0.010), ("mounts", 0.030),
                    ("modules", 0.120), ("devices", 0.050), ("ready", 0.005))
BASE: dict[str, dict[str, float]] = {
    "guestinit": {"vmm": 0.30, "run_init": 2.00, "interp": 0.10},
    "busybox": {"vmm": 0.30, "run_init": 2.00, "interp": 0.0},
    "systemd": {"vmm": 0.30, "run_init": 2.20, "interp": 0.0},
}
USERSPACE = {"busybox": 0.15, "systemd": 1.20}
INITCALLS = (("pci_subsys_init", 41000), ("virtio_mmio_init", 22000),
             ("crypto_init", 9000), ("acpi_init", 7000))


def _run(variant: str, index: int, scale: float) -> dict[str, Any]:
    f = scale * (1 + JITTER[index % len(JITTER)])
    base = BASE[variant]
    vmm, run_init = base["vmm"] * f, base["run_init"] * f
    first_frame = run_init + base["interp"] * f
    stages: list[dict[str, Any]] = []
    if variant == "guestinit":
        t = first_frame
        for name, seconds in GUESTINIT_STAGES:
            stages.append({"name": name, "start_s": t, "end_s": t + seconds * f})
            t += seconds * f
        guest_ready = t
    else:
        guest_ready = run_init + USERSPACE[variant] * f
    offset = vmm  # host time of guest clock 0
    host_ready = guest_ready + offset
    spans = [{"name": "vmm+firmware", "start_s": 0.0, "end_s": vmm},
             {"name": "kernel", "start_s": vmm, "end_s": run_init + offset}]
    if variant == "guestinit":
        spans.append({"name": "interpreter", "start_s": run_init + offset,
                      "end_s": first_frame + offset})
        spans += [{"name": s["name"], "start_s": s["start_s"] + offset,
                   "end_s": s["end_s"] + offset} for s in stages]
    else:
        spans.append({"name": "userspace", "start_s": run_init + offset, "end_s": host_ready})
    spans.append({"name": "ready->shutdown", "start_s": host_ready, "end_s": host_ready + 0.4})
    run: dict[str, Any] = {
        "run": index + 1, "ok": True, "reason": "",
        "host_first_output_s": vmm + 0.05, "host_ready_s": host_ready,
        "host_shutdown_s": host_ready + 0.4, "host_exit_s": host_ready + 0.5,
        "guest_run_init_s": run_init, "guest_crng_ready_s": 0.8 * f,
        "guest_first_frame_s": first_frame if variant == "guestinit" else None,
        "guest_ready_s": guest_ready, "userspace_s": guest_ready - run_init,
        "kernel_offset_s": offset, "stages": stages, "spans": spans,
    }
    if variant == "guestinit":
        run["initcalls"] = [{"name": n, "usecs": round(u * f)} for n, u in INITCALLS]
    return run


def _failed(index: int, reason: str) -> dict[str, Any]:
    run: dict[str, Any] = {"run": index + 1, "ok": False, "reason": reason,
                           "stages": [], "spans": []}
    for key in ("host_first_output_s", "host_ready_s", "host_shutdown_s", "host_exit_s",
                "guest_run_init_s", "guest_crng_ready_s", "guest_first_frame_s",
                "guest_ready_s", "userspace_s", "kernel_offset_s"):
        run[key] = None
    run["host_first_output_s"] = 0.35
    return run


FAIL_REASON = "no ready frame after 120s"


def variant(name: str, runs: int = 5, scale: float = 1.0,
            fail_run: int | None = None) -> dict[str, Any]:
    measured = [_failed(i, FAIL_REASON) if fail_run == i + 1 else _run(name, i, scale)
                for i in range(runs)]
    out: dict[str, Any] = {
        "image": "out/cpu", "root": "initramfs", "init": name, "append": "",
        "cmdline": "console=ttyS0 quiet", **summarize_variant(measured),
        "runs": measured,
        "failures": [{"run": r["run"], "reason": r["reason"]} for r in measured if not r["ok"]],
    }
    return out


def _ratio(doc: dict[str, Any], name: str, base: str, metric: str) -> float | None:
    a = doc["variants"][name]
    b = doc["variants"][base]
    sa = a["ready_s"] if metric == "ready_s" else a["metrics"][metric]
    sb = b["ready_s"] if metric == "ready_s" else b["metrics"][metric]
    if sa["median"] is None or sb["median"] is None:
        return None
    return float(sa["median"] / sb["median"])


def suite_doc(scale: dict[str, float] | None = None, runs: int = 5) -> dict[str, Any]:
    """The suite; ``scale`` multiplies every time of a variant (1.2 = 20% slower)."""
    scale = scale or {}
    doc: dict[str, Any] = {
        "schema": 1, "kind": "guestinit-bench-suite", "created": "2026-12-03T11:00:00Z",
        "command": ["guestinit-bench", "suite", "--runs", str(runs)],
        "machine": copy.deepcopy(MACHINE),
        "settings": {"runs": runs, "warmup": 1, "order": "interleaved", "timeout_s": 120.0,
                     "base_cmdline": "console=ttyS0 quiet"},
        "variants": {
            "guestinit": variant("guestinit", runs, scale.get("guestinit", 1.0)),
            "busybox": variant("busybox", runs, scale.get("busybox", 1.0), fail_run=3),
            "systemd": variant("systemd", runs, scale.get("systemd", 1.0)),
        },
    }
    doc["ratios"] = {
        "p2_ready_vs_busybox": {"variant": "guestinit", "baseline": "busybox", "target": 1.15,
                                "value": _ratio(doc, "guestinit", "busybox", "ready_s")},
        "p3_systemd_vs_guestinit_userspace": {
            "variant": "systemd", "baseline": "guestinit", "target": 3.0,
            "value": _ratio(doc, "systemd", "guestinit", "userspace_s")},
    }
    return doc


def write_suite(directory: Path, doc: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "suite.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
