"""bench.stats: STATS of a sample and the noise-aware comparison."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.stats import (
    TOO_FEW,
    Verdict,
    compare_samples,
    stage_durations,
    summarize,
    summarize_variant,
)
from tests.bench.suitedoc import suite_doc


def test_summarize_known_values_inclusive_quartiles() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0], n_failed=1)
    assert s == {"median": 3.0, "q1": 2.0, "q3": 4.0, "min": 1.0, "max": 5.0,
                 "n_ok": 5, "n_failed": 1, "iqr_rel": pytest.approx(2 / 3)}
    s = summarize([4.0, 1.0, 3.0, 2.0], n_failed=0)  # order does not matter
    assert (s["q1"], s["median"], s["q3"]) == (1.75, 2.5, 3.25)


def test_summarize_drops_nulls_and_handles_zero_and_one_value() -> None:
    assert summarize([None, 2.0, None], 2) == {
        "median": 2.0, "q1": 2.0, "q3": 2.0, "min": 2.0, "max": 2.0, "n_ok": 1,
        "n_failed": 2, "iqr_rel": 0.0}
    assert summarize([], 3) == {"median": None, "q1": None, "q3": None, "min": None,
                                "max": None, "n_ok": 0, "n_failed": 3, "iqr_rel": None}
    assert summarize([0.0, 0.0], 0)["iqr_rel"] is None  # no division by a zero median


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=40),
       st.integers(min_value=0, max_value=5))
def test_summarize_orders_its_quantiles(values: list[float], n_failed: int) -> None:
    s = summarize(values, n_failed)
    assert s["n_ok"] == len(values) and s["n_failed"] == n_failed
    if values:
        assert s["min"] <= s["q1"] <= s["median"] <= s["q3"] <= s["max"]
        assert s["median"] == statistics.median(values)
    else:
        assert s["median"] is None


def test_stage_durations_sum_a_repeated_name_per_run() -> None:
    runs = [{"stages": [{"name": "a", "start_s": 0.0, "end_s": 1.0},
                        {"name": "b", "start_s": 1.0, "end_s": 1.5},
                        {"name": "a", "start_s": 2.0, "end_s": 2.5}]}]
    assert stage_durations(runs) == {"a": [1.5], "b": [0.5]}


def test_summarize_variant_counts_the_failed_run_and_uses_only_ok_ones() -> None:
    v = suite_doc()["variants"]["busybox"]
    again = summarize_variant(v["runs"])
    assert (again["n_ok"], again["n_failed"]) == (4, 1)
    assert again["ready_s"] == v["ready_s"]
    assert again["ready_s"]["n_failed"] == 1
    assert set(again["metrics"]) >= {"userspace_s", "guest_run_init_s", "host_exit_s"}


def test_a_clear_slowdown_is_a_regression_with_an_interval_above_zero() -> None:
    old = [1.00, 1.02, 0.99, 1.01, 0.98]
    c = compare_samples(old, [x * 1.2 for x in old], threshold=0.05)
    assert c.verdict is Verdict.REGRESSION
    assert c.change == pytest.approx(0.2)
    assert c.ci_low is not None and c.ci_high is not None and 0 < c.ci_low <= c.ci_high
    better = compare_samples(old, [x * 0.8 for x in old], threshold=0.05)
    assert better.verdict is Verdict.IMPROVEMENT and better.ci_high is not None
    assert better.ci_high < 0


def test_a_median_shift_inside_the_noise_is_noise() -> None:
    old = [1.0, 1.5, 0.7, 1.3, 0.8, 1.1]
    new = [x + 0.1 for x in old]  # +9.5% on the medians, in a spread of +-40%
    c = compare_samples(old, new, threshold=0.05)
    assert c.change > 0.05
    assert c.ci_low is not None and c.ci_low <= 0
    assert c.verdict is Verdict.NOISE


def test_within_the_threshold_is_unchanged_and_the_seed_fixes_the_interval() -> None:
    old = [1.00, 1.02, 0.99, 1.01, 0.98]
    new = [1.01, 1.03, 1.00, 1.02, 0.99]
    a = compare_samples(old, new, threshold=0.05, seed=0)
    assert a.verdict is Verdict.UNCHANGED
    assert a == compare_samples(old, new, threshold=0.05, seed=0)


def test_too_few_runs_decide_on_the_medians_alone() -> None:
    c = compare_samples([1.0, 1.0], [1.2], threshold=0.05)
    assert c.verdict is Verdict.REGRESSION and c.note == TOO_FEW
    assert c.ci_low is None and c.ci_high is None
    assert compare_samples([1.0], [1.01], 0.05).verdict is Verdict.UNCHANGED
    assert compare_samples([1.0], [0.5], 0.05).verdict is Verdict.IMPROVEMENT
    with pytest.raises(ValueError):
        compare_samples([], [1.0], 0.05)
