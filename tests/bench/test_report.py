from __future__ import annotations

import io
import json

from bench.boot import BootResult
from bench.report import medians, medians_text, one_line, text, write_json


def _res(ok: bool, ready_s: float, exec_ns: int) -> BootResult:
    res = BootResult(ok=ok, reason="" if ok else "guest failed in stage config: x",
                     console_log="/nonexistent/console.log")
    res.timings = {"host_ready_s": ready_s, "guest_init_exec_ns": exec_ns,
                   "guest_ready_ns": exec_ns + 1_000_000, "host_exit_s": ready_s + 1}
    return res


def test_medians_use_only_ok_boots() -> None:
    runs = [_res(True, 9.0, 3_000_000_000), _res(True, 11.0, 3_200_000_000),
            _res(True, 10.0, 3_100_000_000), _res(False, 99.0, 9_000_000_000)]
    med = medians(runs)
    assert med["host_ready_s"] == 10.0
    assert med["guest_init_exec_ns"] == 3_100_000_000
    table = medians_text(runs)
    assert "median of 3 OK boot(s) out of 4" in table
    assert "3100.00 ms  (min 3000.00, max 3200.00)" in table
    assert medians([_res(False, 1, 1)])["host_ready_s"] is None


def test_json_for_several_runs_carries_each_run_and_the_medians() -> None:
    out = io.StringIO()
    write_json([_res(True, 9.0, 1), _res(False, 5.0, 2)], out)
    doc = json.loads(out.getvalue())
    assert doc["ok"] is False and len(doc["runs"]) == 2
    assert doc["median"]["host_ready_s"] == 9.0
    assert doc["runs"][1]["reason"] == "guest failed in stage config: x"


def test_failed_text_names_the_reason_and_the_console_log() -> None:
    res = _res(False, 5.0, 1)
    assert one_line(res) == "FAILED: guest failed in stage config: x"
    body = text(res)
    assert "result: FAILED: guest failed in stage config: x" in body
    assert "console log: /nonexistent/console.log" in body
