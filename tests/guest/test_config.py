from __future__ import annotations

from pathlib import Path

import pytest

from guestinit import config, settings_doc
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
                               "nvrc.smi.pl=300 nvrc.smi.srs=enabled nvrc.uvm.persistence.mode=off "
                               "nvrc.dcgm=on nvrc.uvm.tools=yes nvrc.fm.mode=1 "
                               "nvrc.fm.rail.policy=Symmetric")
    assert cfg["log"] is LogLevel.DEBUG
    assert (cfg.str("smi.lgc"), cfg.str("smi.lmc"), cfg.str("smi.pl"), cfg.str("smi.srs")) == (
        "1500", "2600", "300", "1")
    assert cfg.bool("uvm.persistence") is False
    assert cfg.bool("dcgm") is True and cfg.bool("uvm.tools") is True
    assert cfg.str("fabricmanager.mode") == "1"
    assert cfg.str("fabricmanager.rail_policy") == "symmetric"
    assert cfg.sources["dcgm"] == "cmdline"
    assert cfg.ignored == []


@pytest.mark.parametrize(("value", "level"), [
    ("trace", LogLevel.DEBUG), ("", LogLevel.OFF), ("0", LogLevel.OFF), ("off", LogLevel.OFF),
    ("error", LogLevel.ERROR), ("warn", LogLevel.WARN), ("INFO", LogLevel.INFO),
    ("debug", LogLevel.DEBUG)])
def test_every_nvrc_log_level(value: str, level: LogLevel) -> None:
    assert config.build(cmdline=f"nvrc.log={value}")["log"] is level


@pytest.mark.parametrize(("value", "mode"), [
    ("cpu", Mode.CPU), ("GPU", Mode.GPU), ("nvswitch-nvl4", Mode.NVL4),
    ("NVSWITCH-NVL5", Mode.NVL5), ("servicevm-nvl4", Mode.NVL4), ("nvl5", Mode.NVL5)])
def test_nvrc_mode_names(value: str, mode: Mode) -> None:
    assert config.build(cmdline=f"nvrc.mode={value}")["mode"] is mode


@pytest.mark.parametrize(("key", "value", "want"), [
    ("smi.lgc", "1500,1980", "1500,1980"), ("smi.lmc", "5001", "5001"),
    ("smi.srs", "disabled", "0"), ("smi.srs", "1", "1"), ("fm.mode", "0", "0"),
    ("fm.rail", "greedy", "greedy")])
def test_nvrc_values_normalised(key: str, value: str, want: str) -> None:
    cfg = config.build(cmdline=f"nvrc.{key}={value}")
    name = config.BY_ALIAS[key].name
    assert cfg.str(name) == want


def test_unknown_and_bare_nvrc_keys_are_listed_not_fatal() -> None:
    cfg = config.build(cmdline="nvrc.uvm.options=a=1 nvrc.dcgm guestinit.nosuch=1 "
                               "nvrc.log=info root=/dev/vda nvidia.NVreg_X=1")
    assert cfg.ignored == ["nvrc.uvm.options=a=1", "nvrc.dcgm", "guestinit.nosuch=1"]
    assert cfg.bool("dcgm") is False and cfg["log"] is LogLevel.INFO


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
        ("nvrc.mode=nvswitch-nvl6", "nvrc.mode"),
        ("nvrc.fm.mode=3", "nvrc.fm.mode"),
        ("nvrc.fm.rail.policy=random", "nvrc.fm.rail.policy"),
        ("nvrc.smi.lgc=fast", "nvrc.smi.lgc"),
        ("nvrc.smi.lgc=2000,1000", "nvrc.smi.lgc"),
        ("nvrc.smi.pl=300.5", "nvrc.smi.pl"),
        ("nvrc.smi.srs=maybe", "nvrc.smi.srs"),
        ("nvrc.uvm.tools=2", "nvrc.uvm.tools"),
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
    text = settings_doc.render_file({"modules": "virtio_console,vsock", "log": "debug"})
    cfg = config.build(text)
    assert cfg.words("modules") == ("virtio_console", "vsock")
    with pytest.raises(ConfigError, match="unknown key"):
        settings_doc.render_file({"nope": "1"})
    with pytest.raises(ConfigError, match="log"):
        settings_doc.render_file({"log": "loud"})


def test_describe_lists_every_setting() -> None:
    text = settings_doc.describe()
    for setting in config.SETTINGS:
        assert f"guestinit.{setting.name}=" in text
    assert "nvrc.smi.lgc" in text


def test_shown_defaults_read_back_as_the_defaults() -> None:
    """--help-config shows each default as a user would type it; typing it gives it back."""
    for setting in config.SETTINGS:
        shown = settings_doc.show_default(setting)
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
        "log='loud': expected off, error, warn, info, debug or trace",
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


def test_the_config_stage_warns_of_ignored_words(tmp_path: Path) -> None:
    from guestinit.early import run_config
    from tests.fixtures.accel import frames, kmsg_text, make_boot

    boot = make_boot(tmp_path)
    boot.cmdline = "nvrc.log=info nvrc.future.key=1 nvrc.dcgm guestinit.report=console"
    run_config(boot)
    warning = [f for f in frames(boot) if f.get("event") == "warning"]
    assert len(warning) == 1 and warning[0]["stage"] == "config"
    assert warning[0]["ignored"] == 2
    assert "nvrc.future.key=1 nvrc.dcgm" in str(warning[0]["detail"])
    assert "ignored (unknown key, or no value): nvrc.future.key=1 nvrc.dcgm" in kmsg_text(tmp_path)


def test_the_docs_nvrc_table_is_the_settings_table() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs/guest.md").read_text()
    assert settings_doc.nvrc_table() in doc
    for key, _, _ in settings_doc.NVRC_KEYS:  # every NVRC key reaches a setting
        assert key in config.BY_ALIAS


def test_the_kernels_quiet_quiets_the_init_unless_the_cmdline_asks() -> None:
    kata = "tsc=reliable console=hvc0 console=hvc1 quiet panic=1 nr_cpus=1 selinux=0"
    cfg = config.build("log = info\n", kata)
    assert cfg["log"] == LogLevel.WARN and cfg.sources["log"] == "quiet"
    assert config.build("log = error\n", kata)["log"] == LogLevel.ERROR  # never louder
    assert config.build("", kata + " nvrc.log=debug")["log"] == LogLevel.DEBUG
    assert config.build("", kata + " guestinit.log=info")["log"] == LogLevel.INFO
    assert config.build("", "console=hvc0 quiet=1")["log"] == LogLevel.INFO  # not the word
