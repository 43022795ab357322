from __future__ import annotations

from pathlib import Path

import pytest

from guestinit import config
from guestinit.config import ConfigError, LogLevel, Mode, Restart


def test_defaults() -> None:
    cfg = config.build()
    assert cfg["log"] is LogLevel.INFO
    assert cfg.str("report") == "vsock:2:1040"
    assert cfg.words("agent") == ("/usr/bin/kata-agent",)
    assert cfg["agent.restart"] is Restart.NEVER
    assert cfg.sources["log"] == "default"


def test_cmdline_overrides_file_and_types_values() -> None:
    cfg = config.build(
        "log=warn\nrestart.max=7\n# comment\n\nhostname=\"vm one\"\n",
        'quiet console=ttyS0 guestinit.log=debug guestinit.agent="/bin/agent --x 1" '
        "guestinit.restart.backoff=0.5s guestinit.mode=GPU",
    )
    assert cfg["log"] is LogLevel.DEBUG and cfg.sources["log"] == "cmdline"
    assert cfg.int("restart.max") == 7 and cfg.sources["restart.max"] == "file"
    assert cfg.str("hostname") == "vm one"
    assert cfg.words("agent") == ("/bin/agent", "--x", "1")
    assert cfg.float("restart.backoff") == 0.5
    assert cfg["mode"] is Mode.GPU


def test_nvrc_aliases() -> None:
    cfg = config.build(cmdline="nvrc.log=debug nvrc.smi.lgc=1500 nvrc.smi.lmc=2600 "
                               "nvrc.smi.pl=300 nvrc.smi.srs=1 nvrc.uvm.persistence.mode=off "
                               "nvrc.dcgm=on")
    assert cfg["log"] is LogLevel.DEBUG
    assert (cfg.str("smi.lgc"), cfg.str("smi.lmc"), cfg.str("smi.pl"), cfg.str("smi.srs")) == (
        "1500", "2600", "300", "1")
    assert cfg.bool("uvm.persistence") is False
    assert cfg.bool("dcgm") is True
    assert cfg.sources["dcgm"] == "cmdline"


@pytest.mark.parametrize(
    ("cmdline", "key"),
    [
        ("guestinit.log=loud", "guestinit.log"),
        ("nvrc.log=shouty", "nvrc.log"),
        ("guestinit.restart.max=-1", "guestinit.restart.max"),
        ("guestinit.restart.max=many", "guestinit.restart.max"),
        ("guestinit.report=tcp:1.2.3.4", "guestinit.report"),
        ("guestinit.report=vsock:x:1", "guestinit.report"),
        ("guestinit.agent.restart=sometimes", "guestinit.agent.restart"),
        ("nvrc.dcgm=maybe", "nvrc.dcgm"),
        ("guestinit.shutdown.grace=nan", "guestinit.shutdown.grace"),
        ('guestinit.agent=""', "guestinit.agent"),
        ("guestinit.device.mode=999", "guestinit.device.mode"),
    ],
)
def test_bad_values_name_key_and_value(cmdline: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.build(cmdline=cmdline)
    assert err.value.key == key
    assert key in str(err.value)
    assert repr(cmdline.partition("=")[2].strip('"')) in str(err.value)


def test_unknown_cmdline_keys_ignored_unknown_file_keys_rejected() -> None:
    cfg = config.build(cmdline="guestinit.nosuchkey=1 nvrc.whatever=2 root=/dev/vda")
    assert cfg.sources == config.build().sources
    with pytest.raises(ConfigError, match="nosuchkey"):
        config.build("nosuchkey=1\n")
    with pytest.raises(ConfigError, match="expected key=value"):
        config.build("log\n")


def test_lenient_build_skips_bad_entries() -> None:
    cfg = config.build("bogus=1\n", "guestinit.log=loud guestinit.report=unix:/r.sock",
                       strict=False)
    assert cfg["log"] is LogLevel.INFO
    assert cfg.str("report") == "unix:/r.sock"


def test_split_cmdline_like_the_kernel() -> None:
    assert config.split_cmdline('a=1  b="x y" "c=p q" flag -- init args') == [
        ("a", "1"), ("b", "x y"), ("c", "p q"), ("flag", "")]


def test_render_file_round_trips_and_validates() -> None:
    text = config.render_file({"modules": "virtio_console,vsock", "log": "debug"})
    cfg = config.build(text)
    assert cfg.words("modules") == ("virtio_console", "vsock")
    with pytest.raises(ConfigError, match="unknown key"):
        config.render_file({"nope": "1"})
    with pytest.raises(ConfigError, match="log"):
        config.render_file({"log": "loud"})


def test_describe_lists_every_setting() -> None:
    text = config.describe()
    for setting in config.SETTINGS:
        assert f"guestinit.{setting.name}=" in text
    assert "nvrc.smi.lgc" in text


def test_shown_defaults_read_back_as_the_defaults() -> None:
    """--help-config shows each default as a user would type it; typing it gives it back."""
    for setting in config.SETTINGS:
        shown = config.show_default(setting)
        if shown == '""':
            assert setting.default in ("", ())
            continue
        cfg = config.build("", f"guestinit.{setting.name}={shown}")
        assert cfg[setting.name] == setting.default, (setting.name, shown)


def test_one_bad_line_of_the_file_costs_only_that_line() -> None:
    text = ("report=unix:/run/host.sock\nbogus=1\nlog=loud\nnot a setting\n"
            "hostname=gpu-vm\n")
    cfg = config.build(text, "", strict=False)
    assert cfg.str("report") == "unix:/run/host.sock"  # the lines around the bad ones count
    assert cfg.str("hostname") == "gpu-vm" and cfg.sources["hostname"] == "file"
    assert cfg["log"] is LogLevel.INFO  # the bad value is skipped, the default stays
    assert [str(p) for p in cfg.problems] == [
        "/etc/guestinit.conf:2: bogus='1': unknown key",
        "/etc/guestinit.conf:4: not a setting='': expected key=value",
        "log='loud': expected off, error, warn, info or debug",
    ]
    with pytest.raises(ConfigError, match="bogus"):  # the config stage stays strict
        config.build(text)


def test_the_config_stage_names_every_bad_entry(tmp_path: Path) -> None:
    from guestinit.early import run_config
    from guestinit.stages import BootError
    from tests.fixtures.accel import make_boot

    boot = make_boot(tmp_path)
    boot.cmdline = "guestinit.restart.max=-1"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/guestinit.conf").write_text("bogus=1\nlog=info\n")
    with pytest.raises(BootError) as err:
        run_config(boot)
    assert err.value.reason == ("bad settings /etc/guestinit.conf:1: bogus='1': unknown key; "
                                "guestinit.restart.max='-1': must not be negative")
