"""rootfs/freeze.py: what the image's executable freezes, and that the build fails rather than
a guest dying on import."""

from __future__ import annotations

from pathlib import Path

import pytest

import guestinit
from rootfs import freeze
from rootfs.steps import BuildError
from tests.pidns.test_import_budget import DOC, table_modules

CONFIG_C = Path("/usr/lib/python3.11/config-3.11-x86_64-linux-gnu/config.c")
STDLIB = Path("/usr/lib/python3.11")
GUEST = Path(guestinit.__file__).parent
needs_libpython = pytest.mark.skipif(
    not CONFIG_C.is_file() or not (STDLIB / "os.py").is_file(),
    reason="needs Debian's libpython3.11-dev and python3.11 stdlib")


@pytest.fixture(scope="module")
def builtins() -> frozenset[str]:
    if not CONFIG_C.is_file():
        pytest.skip("needs libpython3.11-dev (config.c)")
    return freeze.builtin_modules(freeze.read_config(CONFIG_C))


@needs_libpython
def test_frozen_set_covers_the_boot_import_table(builtins: frozenset[str]) -> None:
    planned = freeze.plan(GUEST, STDLIB, builtins)
    rows = table_modules(DOC.read_text())
    assert rows
    stdlib_rows = {r for r in rows if not r.startswith("guestinit") and r not in builtins}
    assert stdlib_rows == set(freeze.BOOT_STDLIB), (
        "docs/guest.md's import table and rootfs/freeze.py BOOT_STDLIB differ")
    missing = [r for r in rows if r not in builtins and r not in freeze.PYTHON_FROZEN
               and r not in planned]
    assert not missing, f"boot imports not frozen into the executable: {missing}"


@needs_libpython
def test_every_guestinit_module_but_testing_is_frozen(builtins: frozenset[str]) -> None:
    planned = freeze.plan(GUEST, STDLIB, builtins)
    assert "guestinit.__main__" in planned and "guestinit.nvidia" in planned
    assert planned["guestinit"][1:] == ("/usr/lib/guestinit/guestinit/__init__.py", True)
    assert planned["encodings.utf_8"][1] == "/usr/lib/python3.11/encodings/utf_8.py"
    assert not [n for n in planned if n.startswith("guestinit.testing")]
    assert "guestinit._libc_build" not in planned


@needs_libpython
def test_generator_output_is_byte_identical() -> None:
    wanted = freeze.builtin_modules(freeze.read_config(CONFIG_C)) - {"unicodedata", "pyexpat"}
    first, names = freeze.generate(STDLIB, CONFIG_C, builtins=wanted)
    second, _ = freeze.generate(STDLIB, CONFIG_C, builtins=wanted)
    assert first == second
    assert "PyInit_pyexpat" not in first["config.c"]
    frozen = first["frozen.c"]
    assert '{"guestinit.__main__", M_guestinit____main__,' in frozen
    # the interpreter's table: the same stdlib entries, no guestinit
    stdlib_part = frozen.split("stdlib_frozen[] = {", 1)[1]
    assert '{"re._parser", M_re___parser,' in stdlib_part and "guestinit" not in stdlib_part
    assert names == sorted(names)


def test_config_keeps_core_and_wanted_built_ins_only() -> None:
    text = freeze.read_config(CONFIG_C)
    trimmed, dropped = freeze.trim_config(text, {"select", "zlib"})
    kept = freeze.builtin_modules(trimmed)
    assert {"select", "zlib", "posix", "_io", "_imp"} <= kept
    assert '{"marshal", PyMarshal_Init},' in trimmed  # below MARKER 2: never touched
    assert {"unicodedata", "pyexpat", "_sha3"} <= set(dropped)
    assert not set(dropped) & kept
    assert "PyInit_unicodedata" not in trimmed and "PyInit_select" in trimmed
    with pytest.raises(BuildError, match="ADDMODULE MARKER"):
        freeze.trim_config("int x;\n", {"select"})


def test_version_mismatch_names_both(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"Python 3\.11\.7 .* 3\.11\.2-6\+deb12u9 \(3\.11\.2\)"):
        freeze.check_version("3.11.2-6+deb12u9", builder=(3, 11, 7), header=tmp_path / "none")
    header = tmp_path / "patchlevel.h"
    header.write_text('#define PY_VERSION              "3.11.4"\n')
    with pytest.raises(BuildError, match=r"libpython3\.11-dev is Python 3\.11\.4"):
        freeze.check_version("3.11.2-6", builder=(3, 11, 2), header=header)
    freeze.check_version("3.11.2-6+deb12u9", builder=(3, 11, 2), header=tmp_path / "none")


def _package(tmp_path: Path, body: str) -> Path:
    pkg = tmp_path / "guestinit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "boot.py").write_text(body)
    return pkg


def test_an_unfrozen_boot_import_fails_naming_it(tmp_path: Path) -> None:
    stdlib = tmp_path / "stdlib"
    for name in (*freeze.BOOT_STDLIB, *freeze.START_STDLIB):  # empty stand-ins
        path = stdlib.joinpath(*name.split("."))
        path = path / "__init__.py" if name == "encodings" else path.with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")
    pkg = _package(tmp_path, "import _thread\nimport not_in_the_image\n")
    with pytest.raises(BuildError, match=r"guestinit\.boot: imports not_in_the_image"):
        freeze.plan(pkg, stdlib, frozenset({"_thread"}))


def test_lazy_optional_and_type_only_imports_do_not_count(tmp_path: Path) -> None:
    source = ("from __future__ import annotations\n"
              "TYPE_CHECKING = False\n"
              "if TYPE_CHECKING:\n    import typing\n"
              "try:\n    import _json\nexcept ImportError:\n    _json = None\n"
              "def status():\n    import json\n"
              "from . import sysfs\nfrom .nvidia import devices\n")
    found = freeze.module_imports(source, "guestinit.boot", False)
    names = {n for n, _ in found}
    assert "typing" not in names and "json" not in names
    assert ("_json", True) in found
    assert ("guestinit", False) in found and ("guestinit.sysfs", True) in found
    assert ("guestinit.nvidia", False) in found and ("guestinit.nvidia.devices", True) in found
