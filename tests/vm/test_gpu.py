"""The GPU path in a real guest: nvidia-gpu and nvidia-servicevm images booted in QEMU.

The stand-ins (tests/fixtures/standin_bundle.py): QEMU's ivshmem-plain devices are the
GPUs and its edu devices the NVSwitches, discovered as such through the documented test
profile (``standin.gpu``/``standin.nvswitch``, baked into the test images' config);
the stand-in kernel modules, built for the
guest kernel and loaded by the real kernel, bind them and publish what the NVIDIA driver
publishes; the userspace stand-ins behave like persistenced and the fabric manager. Every
GPU stage runs for real: discovery, mode, module loads, device nodes, daemons, the CDI
spec, lockdown, ready and shutdown.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from bench.boot import BootResult
from bench.live import Live
from bench.qemu import BarDevice
from bench.qmp import QmpError
from guestinit.wire import FrameType
from rootfs import proc
from tests.fixtures import standin_bundle
from tests.fixtures.standin_bundle import GPU_ID, NVSWITCH_ID
from tests.vm.conftest import REPO, _builder, assert_main_phase_after_ready, boot_vm, explain

pytestmark = pytest.mark.vm
MIB = 1 << 20
TWO_GPUS = BarDevice(64 * MIB, count=2)
FOUR_SWITCHES = BarDevice(0, edu=4)
WORDS = ""  # the images bake agent=none: these guests have no kata-agent
# a Kata cmdline written for NVRC, unchanged: every key NVRC reads, and one it does not
NVRC_WORDS = ("nvrc.log=trace nvrc.uvm.persistence.mode=on nvrc.uvm.tools=on nvrc.dcgm=on "
              "nvrc.smi.lgc=1500 nvrc.smi.lmc=5001 nvrc.smi.pl=300 nvrc.smi.srs=enabled "
              "nvrc.fm.rail.policy=greedy nvrc.some.future.key=1")


def _image(profile: str, bundle: Path, out: Path, standin: str) -> str:
    try:
        proc.run([_builder(), "image", profile, "--driver", str(bundle), "--out", str(out),
                  "--append-config", standin, "--append-config", "agent=none",
                  "--standins"],  # the bundle's fake programs need the stand-ins' closure
                 timeout=1800, cwd=str(REPO))
    except proc.RunError as exc:
        pytest.fail(f"building {profile} with the stand-in bundle failed:\n{exc}")
    return str(out)


@pytest.fixture(scope="session")
def gpu_images(cpu_image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """nvidia-gpu, nvidia-servicevm and a gpu image whose bundle lacks nvidia-uvm.ko."""
    release = (Path(cpu_image) / "kernel-release.txt").read_text().strip()
    tmp = tmp_path_factory.mktemp("gpu-images")
    try:
        bundle = standin_bundle.build(tmp / "bundle", release)
        broken = standin_bundle.build(tmp / "broken-bundle", release, drop=("nvidia-uvm.ko",))
    except standin_bundle.StandinError as exc:
        pytest.fail(str(exc))
    # the same bundle whose fabric manager dies after its 2nd partition activation
    crashing = tmp / "crashing-bundle"
    shutil.copytree(bundle, crashing, symlinks=True)
    (crashing / "etc/fake-nvidia/behaviour").write_text(
        "fabricmanager_crash_after_activations=2\n")
    gpu, switch = f"standin.gpu={GPU_ID}", f"standin.nvswitch={NVSWITCH_ID}"
    return {"gpu": _image("nvidia-gpu", bundle, tmp / "nvidia-gpu", gpu),
            "servicevm": _image("nvidia-servicevm", bundle, tmp / "nvidia-servicevm", switch),
            "servicevm-crash": _image("nvidia-servicevm", crashing, tmp / "svm-crash", switch),
            "broken": _image("nvidia-gpu", broken, tmp / "broken", gpu)}


def _ready(res: BootResult) -> dict[str, object]:
    assert res.ok, explain(res)
    ready = res.first(FrameType.READY)
    assert ready is not None
    return ready.fields


@pytest.mark.parametrize(("erofs", "words"), [(False, NVRC_WORDS), (True, WORDS)],
                         ids=["initramfs-nvrc-cmdline", "verity-root"])
def test_gpu_image_runs_every_gpu_stage_on_the_stand_in_driver(
        gpu_images: dict[str, str], tmp_path: Path, erofs: bool, words: str) -> None:
    res = boot_vm(gpu_images["gpu"], tmp_path, erofs=erofs, append=words, bar=TWO_GPUS)
    ready = _ready(res)
    assert ready["mode"] == "gpu"
    devices = ready["inventory"]["devices"]  # type: ignore[index]
    assert [d["kind"] for d in devices] == ["gpu", "gpu"]
    assert [d["bdf"] for d in devices] == TWO_GPUS.bdfs()
    assert ready["modules"][-2:] == ["nvidia", "nvidia_uvm"]  # type: ignore[index]
    daemons = {d["name"]: d for d in ready["daemons"]}  # type: ignore[union-attr]
    assert daemons["nvidia-persistenced"]["running"], daemons
    stages = {name: end - start for name, start, end in res.first(FrameType.READY).timeline()}
    for stage in ("discover", "modules", "devices", "daemons", "cdi", "lockdown"):
        assert stage in stages, stages
    assert any(n.startswith("daemon:nvidia-persistenced") for n in stages), stages
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None, explain(res)
    assert_main_phase_after_ready(res)  # the CDI spec's json without json's accelerator
    audit = "\n".join(map(str, shutdown.fields["audit"]))
    assert "release gpu0 0000:00:01.0 GPU-00000000-" in audit  # the stand-in driver's UUID
    assert "release gpu1 0000:00:02.0 GPU-00000001-" in audit
    assert "nvidia-persistenced: pid" in audit and "stopped (status 0)" in audit
    if words == NVRC_WORDS:  # NVRC's keys took effect, the unknown one only warned
        for name in ("nv-hostengine", "dcgm-exporter"):
            assert daemons[name]["running"], daemons
        assert "smi:lgc" in stages and "smi:lmc" in stages and "smi:pl" in stages
        assert "smi:srs" in stages
        warnings = [r.frame.fields for r in res.frames if r.frame.type == FrameType.PROGRESS
                    and r.frame.fields.get("event") == "warning"]
        assert len(warnings) == 1 and "nvrc.some.future.key=1" in str(warnings[0]["detail"])


def test_service_vm_detects_its_nvswitches_and_runs_the_fabric_manager(
        gpu_images: dict[str, str], tmp_path: Path) -> None:
    res = boot_vm(gpu_images["servicevm"], tmp_path, append=WORDS, bar=FOUR_SWITCHES)
    ready = _ready(res)
    assert ready["mode"] == "nvl4"
    kinds = [d["kind"] for d in ready["inventory"]["devices"]]  # type: ignore[index]
    assert kinds == ["nvswitch"] * 4
    daemons = {d["name"]: d for d in ready["daemons"]}  # type: ignore[union-attr]
    assert daemons["nv-fabricmanager"]["running"], daemons


def test_a_bundle_without_nvidia_uvm_fails_the_boot_naming_the_module(
        gpu_images: dict[str, str], tmp_path: Path) -> None:
    res = boot_vm(gpu_images["broken"], tmp_path, append=WORDS, bar=TWO_GPUS)
    failed = res.first(FrameType.FAILED)
    assert failed is not None, explain(res)
    assert failed.fields["stage"] == "modules"
    assert "nvidia_uvm" in str(failed.fields["reason"]), failed.fields["reason"]
    assert res.qemu_rc == 0  # it powered off after saying why


def test_the_host_controls_the_service_vms_nvlink_partitions(
        gpu_images: dict[str, str], tmp_path: Path) -> None:
    """The partition service (started after nv-fabricmanager, binding built against the
    bundle's libnvfm) answers guestinit-fabric over a virtio-serial port while the VM runs."""
    import contextlib
    import io
    import time

    from bench import fabric

    sock = tmp_path / "partitions.sock"
    calls: list[tuple[list[str], int, str, str, float]] = []

    def cli(*args: str) -> None:
        out, err = io.StringIO(), io.StringIO()
        t0 = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = fabric.main(["--to", f"unix:{sock}", "--by", "vm-test", *args])
        calls.append((list(args), rc, out.getvalue(), err.getvalue(), time.monotonic() - t0))

    def host(live: object) -> None:
        for args in (["list"], ["activate", "3"], ["activate", "4"], ["activate", "1"],
                     ["deactivate", "3"], ["status"]):
            cli(*args)

    res = boot_vm(gpu_images["servicevm"], tmp_path / "boot", bar=FOUR_SWITCHES,
                  append="guestinit.partitions.listen=virtio-port:guestinit.partitions",
                  ports=(("guestinit.partitions", str(sock)),), on_ready=host)
    ready = _ready(res)
    daemons = {d["name"]: d for d in ready["daemons"]}  # type: ignore[union-attr]
    assert daemons["guestinit-partitions"]["running"], daemons
    assert not res.errors, explain(res)
    by = {" ".join(a): (rc, out, err) for a, rc, out, err, _ in calls}
    rc, out, _ = by["list"]
    assert rc == 0 and len(out.splitlines()) == 16, out
    assert out.splitlines()[1].split() == ["0", "Inactive", "8", "144", "1,2,3,4,5,6,7,8"]
    assert by["activate 3"][0] == 0 and by["activate 4"][0] == 0
    assert by["activate 4"][1].startswith("activate partition 4 gpus 2,4 by vm-test")
    rc, _, err = by["activate 1"]
    assert rc == 1 and "FM_ST_IN_USE" in err
    assert by["deactivate 3"][0] == 0
    rc, out, _ = by["status"]
    active = [ln.split()[0] for ln in out.splitlines()[1:16] if ln.split()[1] == "Active"]
    assert rc == 0 and active == ["4"]
    assert "audit: deactivate partition 3 gpus 1,3 by vm-test" in out
    print("round trips (s):", {" ".join(a): round(s, 3) for a, *_, s in calls})


def test_the_activated_partitions_survive_a_fabric_manager_crash(
        gpu_images: dict[str, str], tmp_path: Path) -> None:
    """nv-fabricmanager dies after its 2nd activation; the supervisor restarts it with
    --restart, and the partition service gives it the activated list again."""
    import contextlib
    import io
    import time

    from bench import fabric

    sock = tmp_path / "partitions.sock"
    seen: dict[str, tuple[int, str, str]] = {}

    def cli(*args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = fabric.main(["--to", f"unix:{sock}", "--by", "vm-test", *args])
        return rc, out.getvalue(), err.getvalue()

    def host(live: object) -> None:
        seen["activate 3"], seen["activate 4"] = cli("activate", "3"), cli("activate", "4")
        deadline = time.monotonic() + 40  # the restart's backoff, then FM's start
        while time.monotonic() < deadline:
            seen["list"] = cli("list")
            if seen["list"][0] == 0:
                break
            time.sleep(0.5)
        seen["status"] = cli("status")

    res = boot_vm(gpu_images["servicevm-crash"], tmp_path / "boot", bar=FOUR_SWITCHES,
                  append="guestinit.partitions.listen=virtio-port:guestinit.partitions",
                  ports=(("guestinit.partitions", str(sock)),), on_ready=host)
    _ready(res)
    assert not res.errors, explain(res)
    assert seen["activate 3"][0] == 0 and seen["activate 4"][0] == 0, seen
    rc, out, err = seen["list"]
    assert rc == 0, (err, explain(res))
    active = [ln.split()[0] for ln in out.splitlines()[1:] if ln.split()[1] == "Active"]
    assert active == ["3", "4"], out
    assert "audit: fabric manager restarted: activated list restored [3, 4]" in seen["status"][1]


ONE_GPU_AND_A_FREE_SLOT = BarDevice(64 * MIB, count=1, hotplug_ports=1)
CYCLES = 10


def hotplug_cmdline(image: str, extra: str = "") -> str:
    """The image's cmdline for hot-plug on microvm: its _OSC grants no native hot-plug
    (pcie_ports=native), and with the gpu preset's pci=nocrs no hot-plug event of the root
    port reaches the guest (seen here)."""
    words = (Path(image) / "cmdline.txt").read_text().split()
    return " ".join(w for w in words if w != "pci=nocrs") + " pcie_ports=native " + extra


def _qmp_retry(live: Live, command: str, timeout: float = 30.0, **arguments: object) -> None:
    """``command`` until QEMU takes it (object-del is refused until the device using the
    backend is finalized, after the guest let go of it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            live.qmp.execute(command, **arguments)
            return
        except QmpError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_gpus_hot_added_and_removed_after_ready_are_served_and_released(
        gpu_images: dict[str, str], tmp_path: Path) -> None:
    """QMP device_add of a stand-in GPU on a free root port, then device_del, ten times: each
    add is assigned (node, CDI, audit, frame) and each removal released; PID 1's fds,
    threads and nodes are the same after the last cycle as after the first."""
    cycles: list[tuple[dict[str, object], dict[str, object], float, float]] = []

    def hotplug(event: str, since: int, live: Live) -> dict[str, object]:
        got = live.wait(lambda f: f.get("stage") == "hotplug" and f.get("event") in
                        (event, "refused", "cancelled"), 120, since)
        assert got is not None, f"no hotplug {event} frame within 120 s"
        assert got.frame.get("event") == event, got.frame.fields
        return got.frame.fields

    def host(live: Live) -> None:
        for i in range(CYCLES):
            live.qmp.execute("object-add", **{"qom-type": "memory-backend-ram", "id": f"hb{i}",
                                              "size": 64 * MIB, "share": True})
            mark, t0 = len(live.frames), time.monotonic()
            live.qmp.execute("device_add", driver="ivshmem-plain", memdev=f"hb{i}", bus="hp0",
                             id=f"hg{i}")
            added = hotplug("assign", mark, live)
            mark, t1 = len(live.frames), time.monotonic()
            live.qmp.execute("device_del", id=f"hg{i}")
            released = hotplug("release", mark, live)
            cycles.append((added, released, t1 - t0, time.monotonic() - t1))
            _qmp_retry(live, "object-del", id=f"hb{i}")

    res = boot_vm(gpu_images["gpu"], tmp_path, cmdline=hotplug_cmdline(gpu_images["gpu"]),
                  bar=ONE_GPU_AND_A_FREE_SLOT, on_ready=host)
    _ready(res)
    assert not res.errors, explain(res)
    assert len(cycles) == CYCLES, explain(res)
    for added, released, _, _ in cycles:  # the slot's GPU is gpu1, /dev/nvidia1, every time
        assert str(added["detail"]).startswith("assign gpu1 0000:01:00.0 GPU-"), added
        assert str(added["detail"]).endswith("as /dev/nvidia1 (hot-plug)"), added
        assert added["nodes"] == 2 and released["nodes"] == 1, (added, released)
        assert str(released["detail"]).startswith("release gpu1 0000:01:00.0 GPU-")
    first, last = cycles[0][1], cycles[-1][1]
    assert (last["fds"], last["threads"]) == (first["fds"], first["threads"]), (first, last)
    growth = int(str(last["rss_kib"])) - int(str(cycles[1][1]["rss_kib"]))
    assert growth < 1024, f"PID 1's RSS grew {growth} KiB over {CYCLES - 2} cycles"
    uuids = {str(a["detail"]).split()[3] for a, _, _, _ in cycles}
    assert len(uuids) == CYCLES  # the stand-in driver gives each probe a new UUID
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None, explain(res)
    audit = [str(a) for a in shutdown.fields["audit"]]
    assert sum(a.startswith("assign gpu1 ") for a in audit) == CYCLES
    assert sum(a.startswith("release gpu1 ") and a.endswith("(hot-unplug)")
               for a in audit) == CYCLES
    spans = {name: (end - start) / 1e6 for name, start, end in shutdown.timeline()}
    print(f"hotplug:monitor (pyudev import, monitor, first scan) {spans['hotplug:monitor']:.1f} ms")
    print("hot-plug (guest latency_us add/remove, host s add/remove):",
          [(a["latency_us"], r["latency_us"], round(ta, 2), round(tr, 2))
           for a, r, ta, tr in cycles])
    print("shutdown audit:", *audit, sep="\n  ")
    print("PID 1 after each release (fds, threads, rss KiB, nodes):",
          [(r["fds"], r["threads"], r["rss_kib"], r["nodes"]) for _, r, _, _ in cycles])



@pytest.mark.parametrize("locked", [False, True], ids=["driver-loaded-on-add", "locked"])
def test_a_gpu_hot_added_to_a_guest_that_booted_without_one(
        gpu_images: dict[str, str], tmp_path: Path, locked: bool) -> None:
    """cpu mode at boot (no GPU): the add loads the driver, unless modules_disabled is set;
    then the GPU is refused, naming the setting."""
    got: list[dict[str, object]] = []

    def host(live: Live) -> None:
        live.qmp.execute("object-add", **{"qom-type": "memory-backend-ram", "id": "hb",
                                          "size": 64 * MIB, "share": True})
        live.qmp.execute("device_add", driver="ivshmem-plain", memdev="hb", bus="hp0", id="hg")
        frame = live.wait(lambda f: f.get("stage") == "hotplug" and f.get("event") in
                          ("assign", "refused"), 120)
        assert frame is not None, "no hotplug frame within 120 s"
        got.append(frame.frame.fields)

    cmdline = hotplug_cmdline(gpu_images["gpu"], "" if locked else "guestinit.lockdown=false")
    res = boot_vm(gpu_images["gpu"], tmp_path, cmdline=cmdline,
                  bar=BarDevice(0, hotplug_ports=1), on_ready=host)
    assert _ready(res)["mode"] == "cpu"
    assert not res.errors and len(got) == 1, explain(res)
    (frame,) = got
    if locked:
        assert frame["event"] == "refused", frame
        assert str(frame["detail"]).startswith("GPU 0000:01:00.0 cannot be served: the nvidia "
                                               "driver is not loaded and module loading is "
                                               "locked (modules_disabled=1)")
        assert "guestinit.lockdown=false" in str(frame["detail"])
        return
    assert frame["event"] == "assign", frame
    assert str(frame["detail"]).startswith("assign gpu0 0000:01:00.0 GPU-00000000-")
    assert frame["nodes"] == 1
    shutdown = res.first(FrameType.SHUTDOWN)
    assert shutdown is not None, explain(res)
    audit = [str(a) for a in shutdown.fields["audit"]]
    assert audit[0].startswith("assign gpu0 0000:01:00.0 ") and audit[0].endswith("(hot-plug)")
    assert any(a.startswith("release gpu0 0000:01:00.0 ") for a in audit[1:]), audit
