"""``guestinit-bench optimize``: measured A/B changes to a boot, kept only when faster.

A base (an image directory and its cmdline) and candidate changes to it: kernel
cmdline words, another image directory, the erofs + dm-verity root. Phase 1 boots the
base and every candidate interleaved (``bench.suite.run_suite``); a candidate is
accepted when ``bench.stats.compare_samples`` calls it an IMPROVEMENT on the chosen
metric, the statistics ``compare`` uses. The accepted ones are composed (their words
joined, the best image, erofs) and phase 2 boots base against the composition, again
interleaved, to measure what the changes give together. docs/bench.md, "optimize".

Everything here decides; ``bench.cli_optimize`` boots and ``bench.optimize_report``
writes.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import image
from bench.image import kernel_words
from bench.stats import FLOOR_S, Change, Verdict, compare_samples, metric_values
from bench.suite import Variant

BASE = "base"
COMPOSED = "composed"
RESERVED = (BASE, COMPOSED)
# Like the suite's guestinit variant: no agent, so the boot ends at guestinit's ready.
BASE_APPEND = "guestinit.agent=none"
_NAME = re.compile(r"^[A-Za-z0-9_.:+@,-]+$")


class Kind(enum.StrEnum):
    CMDLINE = "cmdline"  # kernel cmdline words appended to the base's
    IMAGE = "image"      # another image directory, booted with the base's cmdline
    EROFS = "erofs"      # the base image from its erofs + dm-verity root


class OptimizeError(ValueError):
    """Bad input (a candidate spec, a missing image): one line, exit 2, nothing booted."""


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: Kind
    spec: str  # as given: ``cmdline:quiet``, ``image:out/cpu-zstd``, ``erofs``
    words: tuple[str, ...] = ()  # cmdline candidates
    directory: str | None = None  # image candidates, absolute


def parse_candidate(text: str) -> Candidate:
    """``NAME=cmdline:WORDS``, ``NAME=image:DIR`` or ``NAME=erofs``."""
    name, sep, spec = (w.strip() for w in text.partition("="))
    usage = ("use NAME=cmdline:WORDS, NAME=image:DIR or NAME=erofs, "
             "e.g. quiet=cmdline:quiet")
    if not sep or not name or not spec:
        raise OptimizeError(f"candidate {text!r}: {usage}")
    if not _NAME.match(name):
        raise OptimizeError(f"candidate {name!r}: a name is letters, digits and _.:+@,- "
                            "(no spaces or slashes)")
    if name in RESERVED:
        raise OptimizeError(f"candidate {name!r}: the name is reserved for the optimizer's "
                            "own variants; choose another")
    kind_text, colon, value = spec.partition(":")
    if kind_text not in {k.value for k in Kind}:
        raise OptimizeError(f"candidate {name}: unknown kind {kind_text!r} in {spec!r}; "
                            + usage)
    kind = Kind(kind_text)
    value = value.strip()
    if kind is Kind.EROFS:
        if colon:
            raise OptimizeError(f"candidate {name}: erofs takes no value ({spec!r}); "
                                f"use {name}=erofs")
        return Candidate(name, kind, spec)
    if not value:
        what = "WORDS" if kind is Kind.CMDLINE else "DIR"
        raise OptimizeError(f"candidate {name}: {kind}: needs {what} ({spec!r}); {usage}")
    if kind is Kind.CMDLINE:
        return Candidate(name, kind, spec, tuple(kernel_words(value)))
    return Candidate(name, kind, spec, directory=os.path.abspath(value))


def _lines(path: Path) -> list[str]:
    """Non-empty lines of ``path`` with ``#`` comments cut off."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OptimizeError(f"candidates file {path}: {exc.strerror}") from None
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def read_candidates_file(path: Path) -> list[Candidate]:
    """One ``NAME=SPEC`` per line; ``#`` starts a comment."""
    return [parse_candidate(line) for line in _lines(path)]


def fast_preset() -> Path:
    from rootfs.profile import KCONFIG_DIR

    return KCONFIG_DIR / "cmdline" / "fast.txt"


def preset_candidates(path: Path) -> list[Candidate]:
    """One cmdline candidate per option line of a cmdline preset (kernel-config/cmdline/),
    named after the option. ``console=`` is no candidate: the harness always adds one."""
    out = []
    for line in _lines(path):
        words = tuple(kernel_words(line))
        if all(w.startswith("console=") for w in words):
            continue
        out.append(Candidate(words[0], Kind.CMDLINE, f"cmdline:{' '.join(words)}", words))
    return out


def without_words(cmdline: str, candidates: Sequence[Candidate]) -> str:
    """``cmdline`` less every word of ``candidates``: the base they are measured against
    when the image already carries them (the cpu image's cmdline carries fast.txt)."""
    drop = {w for c in candidates for w in c.words}
    return " ".join(w for w in kernel_words(cmdline) if w not in drop)


# -- checks and the variants to boot ----------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What phase 1 boots: the base and one variant per candidate, every image loaded."""

    base_dir: str
    base_cmdline: str  # the image's cmdline words, or --base-cmdline
    candidates: tuple[Candidate, ...]
    variants: tuple[Variant, ...]
    images: Mapping[str, image.Image]


def _load(directory: str, erofs: bool, who: str) -> image.Image:
    try:
        return image.load(directory, erofs=erofs)
    except image.ImageError as exc:
        raise OptimizeError(f"{who}: {exc}") from None


def variant_for(c: Candidate, base_dir: str, base_cmdline: str) -> Variant:
    """The boot of one candidate: the base plus the one change."""
    if c.kind is Kind.CMDLINE:
        return Variant(c.name, base_dir, "guestinit", append=" ".join([BASE_APPEND, *c.words]),
                       cmdline=base_cmdline)
    if c.kind is Kind.IMAGE:
        assert c.directory is not None
        return Variant(c.name, c.directory, "guestinit", append=BASE_APPEND,
                       cmdline=base_cmdline)
    return Variant(c.name, base_dir, "guestinit", erofs=True, append=BASE_APPEND,
                   cmdline=base_cmdline)


def plan(base_dir: str, base_cmdline: str | None, candidates: Sequence[Candidate]) -> Plan:
    """Check everything before anything boots; OptimizeError names the candidate and the fix.

    ``base_cmdline`` None: the image's cmdline.txt words. Every variant boots with the
    base's cmdline words (an image candidate too: it differs from the base by its files
    alone); an erofs boot keeps its image's root words (bench.boot.replace_cmdline).
    """
    if not candidates:
        raise OptimizeError("no candidates: give --candidate NAME=SPEC or --candidates-file")
    base_dir = os.path.abspath(base_dir)
    base_image = _load(base_dir, False, f"base {base_dir}")
    words = base_image.cmdline if base_cmdline is None else " ".join(kernel_words(base_cmdline))
    seen: set[str] = set()
    present = set(kernel_words(words))
    images = {BASE: base_image}
    variants = [Variant(BASE, base_dir, "guestinit", append=BASE_APPEND, cmdline=words)]
    for c in candidates:
        if c.name in seen:
            raise OptimizeError(f"candidate {c.name}: given twice; give each candidate a "
                                "name of its own")
        seen.add(c.name)
        if c.kind is Kind.CMDLINE and set(c.words) <= present:
            raise OptimizeError(
                f"candidate {c.name}: {' '.join(c.words)!r} is already in the base cmdline "
                f"({words!r}), so it would measure nothing; pass --base-cmdline without it "
                "to evaluate it from scratch")
        who = f"candidate {c.name}"
        if c.kind is Kind.IMAGE:
            assert c.directory is not None
            images[c.name] = _load(c.directory, False, who)
        elif c.kind is Kind.EROFS:
            images[c.name] = _load(base_dir, True, f"{who} (the base's erofs root)")
        else:
            images[c.name] = base_image
        variants.append(variant_for(c, base_dir, words))
    return Plan(base_dir, words, tuple(candidates), tuple(variants), images)


# -- acceptance --------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    accepted: bool
    reason: str
    change: Change | None  # None when a side has no value of the metric
    n_ok: int = 0
    n_failed: int = 0
    base_median: float | None = None
    median: float | None = None  # the candidate's, over its OK runs


def decide(base_values: Sequence[float], cand_values: Sequence[float], *,
           failures: Sequence[str] = (), threshold: float = 0.05, floor: float = FLOOR_S,
           seed: int = 0) -> Decision:
    """Accept a candidate only when it is faster beyond the noise and no run of it failed.

    ``failures`` are the reasons of the candidate's failed measured runs; the verdict is
    ``compare``'s (``bench.stats.compare_samples``): IMPROVEMENT is a median change below
    ``-threshold`` whose 95% interval lies wholly below 0.
    """
    n_ok, n_failed = len(cand_values), len(failures)
    change = (compare_samples(base_values, cand_values, threshold, seed, floor)
              if base_values and cand_values else None)
    medians = (statistics.median(base_values) if base_values else None,
               statistics.median(cand_values) if cand_values else None)
    if failures:
        reason = f"{n_failed} of {n_ok + n_failed} runs failed: {failures[0]}"
    elif not base_values:
        reason = "the base has no value of the metric to compare with"
    elif change is None:
        reason = "no OK run has a value of the metric"
    elif change.verdict is Verdict.IMPROVEMENT:
        note = f" ({change.note})" if change.note else ""
        return Decision(True, "faster beyond the noise" + note, change, n_ok, n_failed,
                        *medians)
    elif change.verdict is Verdict.REGRESSION:
        reason = "slower than the base beyond the noise"
    elif change.verdict is Verdict.NOISE:
        reason = ("beyond the threshold, but the 95% interval includes no change: "
                  "rerun with more --runs")
    elif change.note:
        reason = f"no change: {change.note}"
    else:
        reason = f"no change: within the {threshold * 100:g}% threshold"
    return Decision(False, reason, change, n_ok, n_failed, *medians)


def decide_variant(base: Mapping[str, object], cand: Mapping[str, object], metric: str,
                   threshold: float, floor: float) -> Decision:
    """``decide`` on two suite variant entries (their measured runs)."""
    runs = cand.get("runs", [])
    assert isinstance(runs, list)
    failures = [str(r["reason"]) for r in runs if not r.get("ok")]
    got = decide(metric_values(base, metric), metric_values(cand, metric),
                 failures=failures, threshold=threshold, floor=floor)
    # n_ok counts the OK runs, also those without a value of the metric
    return dataclasses.replace(got, n_ok=len(runs) - len(failures))


# -- composition -------------------------------------------------------------------

@dataclass(frozen=True)
class Composition:
    """The accepted candidates together: words in candidate order, one image, the root."""

    candidates: tuple[str, ...]
    words: tuple[str, ...]
    directory: str
    image_from: str | None = None  # the image candidate chosen; None: the base's image
    erofs_from: str | None = None  # the erofs candidate; None: the initramfs root
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def erofs(self) -> bool:
        return self.erofs_from is not None


def compose(base_dir: str, accepted: Sequence[tuple[Candidate, float]]) -> Composition:
    """``accepted``: (candidate, its median) in candidate order.

    Cmdline words are joined (a repeated word once; for one key given twice the later
    word wins in the kernel and in guestinit); of the image candidates only the one with
    the lowest median can be in, the others are named in ``notes``.
    """
    order = [c.name for c, _ in accepted]
    words: list[str] = []
    names: list[str] = []
    for c, _ in accepted:
        if c.kind is Kind.CMDLINE:
            words.extend(w for w in c.words if w not in words)
            names.append(c.name)
    imgs = sorted(((m, order.index(c.name), c) for c, m in accepted if c.kind is Kind.IMAGE),
                  key=lambda t: (t[0], t[1]))
    directory, image_from, notes = base_dir, None, []
    if imgs:
        best_median, _, best = imgs[0]
        assert best.directory is not None
        directory, image_from = best.directory, best.name
        names.append(best.name)
        notes = [f"image candidate {c.name} left out: {best.name} has the lower median "
                 f"({best_median:.3f} s vs {m:.3f} s)" for m, _, c in imgs[1:]]
    erofs_from = next((c.name for c, _ in accepted if c.kind is Kind.EROFS), None)
    if erofs_from is not None:
        names.append(erofs_from)
    names.sort(key=order.index)
    return Composition(tuple(names), tuple(words), directory, image_from, erofs_from,
                       tuple(notes))


def composition_variant(comp: Composition, base_cmdline: str) -> Variant:
    return Variant(COMPOSED, comp.directory, "guestinit", erofs=comp.erofs,
                   append=" ".join([BASE_APPEND, *comp.words]), cmdline=base_cmdline)


def load_composition(comp: Composition) -> tuple[Composition, image.Image]:
    """The composition's image; a chosen image without an erofs root is composed on its
    initramfs (a note says so) rather than not at all."""
    try:
        return comp, image.load(comp.directory, erofs=comp.erofs)
    except image.ImageError as exc:
        if not comp.erofs:
            raise OptimizeError(f"composition: {exc}") from None
        note = (f"{comp.erofs_from} left out: the chosen image {comp.image_from} has no "
                f"erofs root ({exc})")
        comp = Composition(tuple(n for n in comp.candidates if n != comp.erofs_from),
                           comp.words, comp.directory, comp.image_from, None,
                           (*comp.notes, note))
        return comp, _load(comp.directory, False, "composition")
