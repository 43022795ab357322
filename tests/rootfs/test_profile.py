"""Profile parsing: every shipped profile loads; bad ones fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from rootfs import profile
from rootfs.profile import ProfileError


def write(tmp_path: Path, text: str, name: str = "p") -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", sorted(p.stem for p in profile.PROFILES_DIR.glob("*.toml")))
def test_shipped_profiles_load(name: str) -> None:
    prof = profile.load(name)
    assert prof.name == name
    assert prof.cmdline()[0].startswith("console=")


def test_cpu_profile() -> None:
    prof = profile.load("cpu")
    assert prof.init is profile.Init.GUESTINIT
    assert prof.kernel.early == ("virtio_mmio", "virtio_console", "vsock",
                                 "vmw_vsock_virtio_transport", "button", "evdev")
    assert prof.kernel.modules == ("button", "evdev", "vsock_loopback")  # the last: VM tests
    words = prof.cmdline()
    assert len(words) == len(set(words)), "presets must not duplicate words"


def test_cpu_tuned_builds_its_kernel_with_every_boot_driver_built_in() -> None:
    prof = profile.load("cpu-tuned")
    assert prof.kernel.build and prof.kernel.package == "linux-source-6.1"
    assert prof.kernel.fragments == ("base.conf", "microvm.conf", "fastboot.conf")
    assert prof.kernel.early == () and prof.kernel.modules == ()
    assert prof.cmdline() == profile.load("cpu").cmdline()  # same cmdline, other kernel


@pytest.mark.parametrize(("text", "match"), [
    ('colour = "red"\n', "unknown key colour"),
    ('[kernel]\nmodulez = ["x"]\n', "unknown key kernel.modulez"),
    ('init = "sysvinit"\n', "key init: 'sysvinit' is not one of guestinit, busybox, systemd"),
    ('formats = ["iso"]\n', "key formats"),
    ('debs = "libc6"\n', "key debs: expected a list"),
    ("shell = 1\n", "key shell: expected true or false"),
    ("standins = \"yes\"\n", "key standins: expected true or false"),
    ('[kernel]\nfragments = ["nope.conf"]\n', "key kernel.fragments: .*nope.conf does not exist"),
    ('[kernel]\ncmdline_presets = ["x.txt"]\n', "key kernel.cmdline_presets"),
    ("[users]\ndaemon = 0\n", "key users.daemon: expected a uid"),
    ('[config]\nbogus = "1"\n', "key config.bogus: .*unknown key"),
    ('[config]\nlog = "loud"\n', "key config.log"),
    ('[config]\nuvm.persistence = "1"\n', "key config.uvm: expected a string"),
    ('[kernel]\nbuild = true\n', "linux-image-amd64' is not a linux-source-\\* package"),
    ('[kernel]\npackage = "linux-source-6.1"\n', "is a source package: set kernel.build"),
    ('[kernel]\npackage = "linux-source-6.1"\nbuild = "yes"\n', "key kernel.build: expected"),
    ('extends = "missing"\n', "no such file"),
    ("init = \n", "not valid TOML"),
])
def test_bad_profiles_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ProfileError, match=match):
        profile.load(write(tmp_path, text))


def test_extends_merges_tables(tmp_path: Path) -> None:
    write(tmp_path, 'debs = ["libc6"]\n[kernel]\nearly = ["vsock"]\n[config]\nlog = "debug"\n',
          "base")
    child = profile.load(write(tmp_path, 'extends = "base"\nshell = true\n[config]\n'
                               'hostname = "vm"\n'))
    assert child.debs == ("libc6",)
    assert child.kernel.early == ("vsock",)
    assert child.config == {"log": "debug", "hostname": "vm"}
    assert child.shell


def test_extends_cycle(tmp_path: Path) -> None:
    write(tmp_path, 'extends = "b"\n', "a")
    write(tmp_path, 'extends = "a"\n', "b")
    with pytest.raises(ProfileError, match="cycle"):
        profile.load(str(tmp_path / "a.toml"))


def test_lock_command_pins_kernel_and_debs(tmp_path: Path) -> None:
    from rootfs import fetch
    from rootfs.cli import main

    src = profile.PROFILES_DIR / "baseline-busybox.toml"
    path = tmp_path / "bb.toml"
    path.write_text(src.read_text().replace('lock = "debian.lock"', 'lock = "bb.lock"'))
    assert main(["lock", str(path)]) == 0
    lock = fetch.Lock.load(tmp_path / "bb.lock")
    kpkg = lock.kernel["linux-image-amd64"]
    assert kpkg.startswith("linux-image-6.") and kpkg.endswith("-amd64")
    assert set(lock.debs) == {"busybox-static", kpkg}
    assert len(lock.debs["busybox-static"].sha256) == 64
    again = fetch.Lock.load(tmp_path / "bb.lock")
    assert again.render() == lock.render()  # the written file reads back the same
