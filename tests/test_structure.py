"""The code's shape (issue #23): imports flow one way, modules stay readable."""

from __future__ import annotations

from pathlib import Path

from tests import import_graph


def test_no_import_circles_in_our_packages() -> None:
    # every import counts: module level, lazy (inside a function) and type-only
    assert import_graph.circles(import_graph.graph()) == []


def test_no_module_over_400_lines() -> None:
    assert import_graph.long_modules() == {}


def test_the_graph_sees_lazy_and_type_only_circles(tmp_path: Path) -> None:
    pkg = tmp_path / "guestinit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("TYPE_CHECKING = False\nif TYPE_CHECKING:\n"
                              "    from guestinit.b import B\n")
    (pkg / "b.py").write_text("def f():\n    from guestinit import c\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text("import guestinit.a\n" + "x = 1\n" * 401)
    for name in ("rootfs", "bench"):
        (tmp_path / name).mkdir()
    edges = import_graph.graph(tmp_path)
    assert edges["guestinit.d"] == {"guestinit.a"}
    assert import_graph.circles(edges) == [["guestinit.a", "guestinit.b", "guestinit.c"]]
    assert import_graph.long_modules(tmp_path) == {"guestinit.d": 402}
