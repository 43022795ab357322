from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pidns.harness import NsInit


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/pidns/" in str(item.fspath):
            item.add_marker(pytest.mark.pidns)


@pytest.fixture
def ns_init(tmp_path: Path) -> Iterator[type[NsInit]]:
    """Factory: ``ns_init(tmp_path, cmdline=...)``; every init started is killed after."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("the pid-namespace tier needs root and unshare (util-linux)")
    started: list[NsInit] = []

    class Tracked(NsInit):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            started.append(self)

    yield Tracked
    for init in started:
        init.close()
