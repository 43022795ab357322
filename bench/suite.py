"""``guestinit-bench suite``: boot variants side by side, interleaved, into one result directory.

Every variant boots on the same QEMU command line (machine, memory, accelerator,
CPU model, entropy source): only the image and the kernel cmdline words differ.
Runs go round-robin (A B C A B C ...) so that drift in the machine's load hits every
variant alike; the first ``warmup`` rounds are thrown away (page cache, CPU clocks).
A failed run is kept, counted and reported with its reason, never dropped.
"""

from __future__ import annotations

import datetime
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from bench import image
from bench.boot import BootOptions, BootResult, prepare, run
from bench.machine import describe_machine, guest_kernel
from bench.measure import measure
from bench.qemu import QEMU, BarDevice

SCHEMA = 1
KIND = "guestinit-bench-suite"
DEFAULT_VARIANTS = ("guestinit", "guestinit-erofs", "busybox", "systemd")
TUNED = "-tuned"  # the variants on cpu-tuned's kernel: guestinit-tuned, busybox-tuned, ...
DEMO_AGENT = ('guestinit.agent="/usr/bin/python3.11 -IS '
              '/usr/lib/guestinit/guestinit/testing/agent_standin.py" '
              'guestinit.agent.ready=syslog:agent-standin-ready')
NO_ENTROPY = "@no-rng"  # suffix of the twin variants --also-entropy-none adds


@dataclass(frozen=True)
class Variant:
    """One thing to boot: an image directory, its root, its init, extra cmdline words."""

    name: str
    profile: str  # the image directory under --images (out/<profile>), or an absolute path
    init: str  # guestinit, busybox or systemd
    erofs: bool = False
    append: str = ""
    entropy: str | None = None  # None: the suite's --entropy
    bar: BarDevice | None = None  # PCIe and a large-BAR device (bar-sweep)
    cmdline: str | None = None  # replaces the image's cmdline words (BootOptions.cmdline)
    machine: str = "microvm"  # or "kata": q35 + OVMF, the image's configuration.toml


# The baselines do the same work as guestinit does with agent=none (mount, load the
# same modules, ready frame, power button, shutdown frame): no agent on either side.
BUILTIN: dict[str, Variant] = {
    v.name: v for v in (
        Variant("guestinit", "cpu", "guestinit", append="guestinit.agent=none"),
        Variant("guestinit-erofs", "cpu", "guestinit", erofs=True,
                append="guestinit.agent=none"),
        Variant("guestinit-agent", "cpu", "guestinit", append=DEMO_AGENT),
        Variant("busybox", "baseline-busybox", "busybox"),
        Variant("systemd", "baseline-systemd", "systemd"),
        # the same three on the tuned kernel (cpu-tuned's): where the init's start-up is
        # most of the boot
        Variant("guestinit-tuned", "cpu-tuned", "guestinit", append="guestinit.agent=none"),
        Variant("busybox-tuned", "baseline-busybox-tuned", "busybox"),
        Variant("systemd-tuned", "baseline-systemd-tuned", "systemd"),
    )
}

# --machine kata: the same three inits on Kata's machine, each image in Kata's format on the
# kata kernel, booted with the cmdline Kata's runtime writes (no initrd, verity root).
KATA_BUILTIN: dict[str, Variant] = {
    v.name: v for v in (
        Variant("guestinit", "kata", "guestinit", append="guestinit.agent=none",
                machine="kata"),
        Variant("guestinit-agent", "kata", "guestinit", append=DEMO_AGENT, machine="kata"),
        Variant("busybox", "baseline-busybox-kata", "busybox", machine="kata"),
        Variant("systemd", "baseline-systemd-kata", "systemd", machine="kata"),
    )
}
KATA_DEFAULT_VARIANTS = ("guestinit", "busybox", "systemd")


def builtin(machine: str) -> dict[str, Variant]:
    return KATA_BUILTIN if machine == "kata" else BUILTIN


class SuiteError(ValueError):
    """Bad input to the suite (unknown variant, missing image): one line, exit 2."""


def _split_spec(option: str, spec: str, usage: str,
                known: Mapping[str, Variant] = BUILTIN) -> tuple[str, Variant, str]:
    """``NAME=VALUE`` (based on guestinit) or ``BASE+NAME=VALUE``: (name, base, value)."""
    name, sep, value = spec.partition("=")
    if not sep or not name or not value.strip():
        raise SuiteError(f"{option} {spec!r}: {usage}")
    base_name, plus, _ = name.partition("+")
    base = known.get(base_name if plus else "guestinit")
    if base is None:
        raise SuiteError(f"{option} {spec!r}: unknown base variant {base_name!r} "
                         f"(known: {', '.join(known)})")
    return name, base, value


def parse_append(spec: str, known: Mapping[str, Variant] = BUILTIN) -> Variant:
    """``NAME=ARGS`` (a guestinit variant plus ARGS) or ``BASE+NAME=ARGS`` (BASE plus ARGS;
    BASE may be an ``--image`` variant)."""
    name, base, args = _split_spec("--append", spec, "use NAME=ARGS, e.g. quiet7='loglevel=7', "
                                   "or BASE+NAME=ARGS to start from another variant", known)
    return Variant(name, base.profile, base.init, base.erofs,
                   f"{base.append} {args}".strip(), base.entropy, machine=base.machine)


def parse_image(spec: str, known: Mapping[str, Variant] = BUILTIN) -> Variant:
    """``NAME=DIR``: another build of a guestinit image (e.g. the last release's) as a
    variant; ``BASE+NAME=DIR`` boots DIR the way variant BASE is booted."""
    name, base, directory = _split_spec(
        "--image", spec, "use NAME=DIR, e.g. before=out/cpu-main, or BASE+NAME=DIR, "
        "e.g. busybox+raw=/tmp/busybox-raw", known)
    return Variant(name, os.path.abspath(directory), base.init, base.erofs, base.append,
                   machine=base.machine)


def select(names: Sequence[str], appends: Sequence[str], no_entropy_twins: bool,
           images: Sequence[str] = (), machine: str = "microvm") -> list[Variant]:
    table = builtin(machine)
    out: list[Variant] = []
    for name in names:
        if name not in table:
            raise SuiteError(f"unknown variant {name!r} on the {machine} machine (known: "
                             f"{', '.join(table)}; add cmdline variants with --append "
                             "NAME=ARGS)")
        out.append(table[name])
    built = [parse_image(spec, table) for spec in images]
    known = {**table, **{v.name: v for v in built}}  # --append may start from an image
    out.extend(parse_append(spec, known) for spec in appends)
    out.extend(built)
    if no_entropy_twins:
        out.extend(Variant(v.name + NO_ENTROPY, v.profile, v.init, v.erofs, v.append, "none",
                           machine=v.machine) for v in list(out))
    seen: set[str] = set()
    for v in out:
        if v.name in seen:
            raise SuiteError(f"variant {v.name!r} given twice")
        seen.add(v.name)
    if not out:
        raise SuiteError("no variants to run")
    return out


# -- the machine and the whole suite ----------------------------------------------

@dataclass
class Settings:
    runs: int = 5
    warmup: int = 1
    timeout: float = 120.0
    memory_mib: int = 1024
    accel: str = "tcg"  # resolved by the caller (bench.qemu.choose_accel)
    accel_why: str = "requested"
    entropy: str = "rdrand"
    images: str = "out"
    qemu: str = QEMU
    keep_logs: bool = False  # copy every run's console log, not only failed runs'
    base_cmdline: str = ""  # the first variant's image cmdline (before harness words)
    bar: BarDevice | None = None  # --bar: every variant on PCIe with this BAR device
    command: list[str] = field(default_factory=list)
    # the seed of each round's shuffled order: the host's speed can alternate from boot to
    # boot, and a fixed order ties a variant to one speed (docs/bench.md, "suite")
    seed: int = 0


def load_images(variants: list[Variant], images_dir: str) -> dict[str, image.Image]:
    """Every variant's image, before anything boots; SuiteError names a missing one."""
    out = {}
    for v in variants:
        directory = os.path.join(images_dir, v.profile)
        try:
            out[v.name] = (image.load_kata(directory) if v.machine == "kata"
                           else image.load(directory, erofs=v.erofs, profile=v.profile))
        except image.ImageError as exc:
            build = "" if os.path.isabs(v.profile) else f" (or ./build.sh image {v.profile})"
            raise SuiteError(f"variant {v.name}: {exc}{build}") from None
    return out


Reporter = Callable[[int, int, str, int, dict[str, object]], None]
# Adds to (and may fail) a run's record from its boot: bar-sweep checks the BAR size.
Extra = Callable[[Variant, BootResult, dict[str, object]], None]


def machine_for(images: dict[str, image.Image], settings: Settings) -> dict[str, object]:
    first = next(iter(images.values()))
    machine = describe_machine(settings.accel, settings.entropy, settings.qemu,
                               guest_kernel(first.directory), settings.memory_mib)
    machine["accel_why"] = settings.accel_why
    if first.machine == "kata":
        machine["machine_type"] = "q35 + OVMF (Kata's machine, bench/kata.py)"
        machine["firmware"] = BootOptions.firmware
    return machine


def run_suite(variants: list[Variant], images: dict[str, image.Image], settings: Settings,
              out_dir: str, report: Reporter,
              doc_variants: dict[str, dict[str, object]], extra: Extra | None = None) -> None:
    """Boot every variant ``warmup + runs`` times, interleaved (each round in an order
    shuffled from ``settings.seed``), into ``doc_variants`` (filled as runs end, so an
    interrupted suite still has what it measured).

    ``report(done, total, variant, round, record)`` is called after every boot.
    """
    accel = settings.accel
    logs = os.path.join(out_dir, "logs")
    for v in variants:
        doc_variants[v.name] = {
            "image": images[v.name].directory,
            # kata: Kata's disk, p1 erofs checked against p2 by dm-verity (docs/kata.md)
            "root": "kata" if v.machine == "kata" else "erofs" if v.erofs else "initramfs",
            "kernel_entry": images[v.name].entry,
            "init": v.init, "append": v.append, "entropy": v.entropy or settings.entropy,
            "cmdline": "", "runs": [], "warmup_failures": [],
        }
    rounds = settings.warmup + settings.runs
    total, done = rounds * len(variants), 0
    shuffle = random.Random(settings.seed).shuffle
    with tempfile.TemporaryDirectory(prefix="guestinit-suite-") as tmp:
        for rnd in range(rounds):
            warm = rnd < settings.warmup
            order = list(variants)
            shuffle(order)
            for v in order:
                entry = doc_variants[v.name]
                workdir = os.path.join(tmp, f"{v.name.replace('/', '_')}-{rnd}")
                opts = BootOptions(append=v.append, timeout=settings.timeout,
                                   erofs=v.erofs, memory_mib=settings.memory_mib,
                                   accel=accel, workdir=workdir, qemu=settings.qemu,
                                   entropy=v.entropy or settings.entropy,
                                   bar=v.bar or settings.bar, cmdline=v.cmdline)
                res, spec = prepare(images[v.name], opts)
                entry["cmdline"] = res.cmdline
                run(res, spec, opts, progress=None)
                with open(res.console_log, "rb") as fh:
                    console = fh.read()
                rec = measure(res, console)
                if extra is not None:
                    extra(v, res, rec)
                done += 1
                if warm:
                    if not rec["ok"]:
                        entry["warmup_failures"].append(  # type: ignore[attr-defined]
                            {"round": rnd + 1, "reason": rec["reason"]})
                else:
                    rec = {"run": rnd - settings.warmup + 1, **rec}
                    entry["runs"].append(rec)  # type: ignore[attr-defined]
                    if not rec["ok"] or settings.keep_logs:
                        os.makedirs(logs, exist_ok=True)
                        shutil.copyfile(res.console_log, os.path.join(
                            logs, f"{v.name.replace('/', '_')}-run{rec['run']}.console.log"))
                report(done, total, v.name, rnd + 1, rec if not warm else
                       {"warmup": True, **rec})


def assemble(doc_variants: dict[str, dict[str, object]], machine: dict[str, object],
             settings: Settings, interrupted: bool = False) -> dict[str, object]:
    """Statistics over the OK runs of each variant, the ratios, the whole document."""
    from bench.stats import summarize_variant

    for entry in doc_variants.values():
        runs = entry["runs"]
        assert isinstance(runs, list)
        entry.update(summarize_variant(runs))
        entry["failures"] = [{"run": r["run"], "reason": r["reason"]} for r in runs
                             if not r["ok"]]
    return {
        "schema": SCHEMA, "kind": KIND,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": settings.command, "machine": machine,
        "settings": {"runs": settings.runs, "warmup": settings.warmup,
                     "order": f"interleaved, shuffled each round (seed {settings.seed})",
                     "timeout_s": settings.timeout,
                     "memory_mib": settings.memory_mib, "entropy": settings.entropy,
                     "interrupted": interrupted, "base_cmdline": settings.base_cmdline,
                     "bar_bytes": settings.bar.size if settings.bar is not None else None,
                     "pci_devices": settings.bar.bdfs() if settings.bar is not None else []},
        "variants": doc_variants,
        "ratios": ratios(doc_variants),
    }


def _median(doc_variants: dict[str, dict[str, object]], name: str, metric: str) -> float | None:
    entry = doc_variants.get(name)
    if entry is None:
        return None
    stats = entry["metrics"][metric]  # type: ignore[index]
    value = stats["median"]
    return float(value) if isinstance(value, int | float) else None


def ratios(doc_variants: dict[str, dict[str, object]]) -> dict[str, object]:
    """P2 (ready vs busybox, ≤ 1.15) and P3 (systemd's userspace vs ours, ≥ 3), per entropy
    and on the tuned kernel."""
    out: dict[str, object] = {}
    for suffix, tag in (("", ""), (NO_ENTROPY, "_no_rng"), (TUNED, "_tuned")):
        pairs = (
            (f"p2_ready_vs_busybox{tag}", "guestinit" + suffix, "busybox" + suffix,
             "host_ready_s", 1.15, "<="),
            (f"p3_systemd_vs_guestinit_userspace{tag}", "systemd" + suffix,
             "guestinit" + suffix, "userspace_s", 3.0, ">="),
        )
        for key, num, den, metric, target, pass_if in pairs:
            if num not in doc_variants or den not in doc_variants:
                continue
            a, b = _median(doc_variants, num, metric), _median(doc_variants, den, metric)
            out[key] = {"variant": num, "baseline": den, "metric": metric,
                        "value": round(a / b, 4) if a is not None and b else None,
                        "target": target, "pass_if": pass_if}
    return out


def default_out_dir(machine_name: str, today: datetime.date | None = None) -> str:
    day = (today or datetime.date.today()).isoformat()
    return os.path.join("bench", "results", f"{day}-{machine_name}")


def line(done: int, total: int, name: str, rnd: int, rec: dict[str, object]) -> str:
    what = "warm-up" if rec.get("warmup") else f"run {rec.get('run')}"
    if rec["ok"]:
        ready, user = rec["host_ready_s"], rec["userspace_s"]
        tail = f"OK  ready {ready:.2f} s" if isinstance(ready, float) else "OK"
        if isinstance(user, float):
            tail += f", Run /init -> ready {user * 1000:.0f} ms"
    else:
        tail = f"FAILED: {rec['reason']}"
    return f"[{done:>3}/{total}] {name:<18} {what:<8} {tail}"


class Progress:
    """A rich progress bar on a terminal; one plain line per boot otherwise (CI logs)."""

    def __init__(self, stream: TextIO, total: int) -> None:
        self.stream = stream
        self.bar = None
        if stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(file=stream))
            self.task = self.bar.add_task("booting", total=total)
            self.bar.start()

    def __call__(self, done: int, total: int, name: str, rnd: int,
                 rec: dict[str, object]) -> None:
        text = line(done, total, name, rnd, rec)
        if self.bar is not None:
            self.bar.console.print(text)
            self.bar.update(self.task, completed=done, description=f"booting {name}")
        else:
            print(text, file=self.stream, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def write_doc(doc: dict[str, object], out_dir: str) -> str:
    import json

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "suite.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def verdict(doc: dict[str, object]) -> tuple[int, list[str]]:
    """Exit status and the lines that say why: 2 a variant never booted, 1 some runs failed."""
    variants = doc["variants"]
    assert isinstance(variants, dict)
    never, some = [], []
    for name, entry in variants.items():
        n_ok, n_failed = entry["n_ok"], entry["n_failed"]
        failures = entry["failures"]
        why = f": {failures[0]['reason']}" if failures else ""
        if n_ok == 0:
            never.append(f"variant {name}: 0 of {n_failed} runs OK{why}")
        elif n_failed:
            some.append(f"variant {name}: {n_failed} of {n_ok + n_failed} runs failed{why}")
    return (2 if never else 1 if some else 0), never + some
