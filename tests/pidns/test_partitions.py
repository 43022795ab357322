"""The service VM's partition service with the real init as PID 1 of a pid namespace: the
init forced to nvl4 over the fake HGX board's NVSwitches starts nv-fabricmanager's
stand-in (Shared NVSwitch), then the partition service on a Unix socket, and
guestinit-fabric drives it (issue #25)."""

from __future__ import annotations

import contextlib
import io
import site
import sys
from pathlib import Path

import cffi

from bench import fabric as cli
from guestinit.nvidia import daemons, fabric
from guestinit.wire import FrameType
from tests.pidns.harness import NsInit, agent_arg
from tests.pidns.test_accel import AGENT, hgx_root

CHECKOUT = Path(__file__).resolve().parents[2]


def service_vm_root(root: Path) -> None:
    """The fake HGX board and bundle, plus what the service runs on in an image: python3.11
    and a site directory with guestinit, msgpack, cffi's backend and the binding built
    against the bundle's libnvfm."""
    hgx_root()(root)  # type: ignore[operator]
    (root / "usr/bin/python3.11").symlink_to(sys.executable)
    site_dir = root / daemons.GUEST_SITE.lstrip("/")
    site_dir.mkdir(parents=True)
    (site_dir / "guestinit").symlink_to(CHECKOUT / "guestinit")
    packages = Path(site.getsitepackages()[0])
    (site_dir / "msgpack").symlink_to(packages / "msgpack")
    backend = next(Path(cffi.__file__).parent.parent.glob("_cffi_backend*.so"))
    (site_dir / backend.name).symlink_to(backend)
    fabric.build(site_dir, root / "usr/lib/x86_64-linux-gnu")


def run(uri: str, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["--to", uri, "--by", "pidns-test", *args])
    return rc, out.getvalue(), err.getvalue()


def test_the_partition_service_runs_after_the_fabric_manager_in_a_service_vm(
        ns_init: type[NsInit], tmp_path: Path) -> None:
    sock = tmp_path / "partitions.sock"
    init = ns_init(tmp_path, agent_arg() + AGENT + " guestinit.mode=nvl4 "
                   f"guestinit.partitions.listen=unix:{sock}", root_setup=service_vm_root)
    ready = init.wait_frame(FrameType.READY, timeout=60)
    assert ready.get("mode") == "nvl4"
    services = {d["name"]: d for d in ready.get("daemons")}  # type: ignore[union-attr]
    assert services["nv-fabricmanager"]["running"] and services["guestinit-partitions"]["running"]
    uri = f"unix:{sock}"
    rc, out, _ = run(uri, "list")
    assert rc == 0 and len(out.splitlines()) == 16
    assert run(uri, "activate", "3")[0] == 0
    rc, _, err = run(uri, "activate", "1")
    assert rc == 1 and "FM_ST_IN_USE" in err
    rc, out, _ = run(uri, "status")
    assert rc == 0 and "audit: activate partition 3 gpus 1,3 by pidns-test" in out
