"""NVIDIA's modules and parameters: what each mode loads, what the init sets."""

from __future__ import annotations

from guestinit.nvidia import modules
from guestinit.values import Fabric, Mode
from tests.fixtures.accel import accelerators, gpu_bdfs


def test_parameters_the_init_chooses() -> None:
    assert modules.auto_params(Mode.GPU, 1, 0o660, 44) == [
        "nvidia.NVreg_DeviceFileMode=0660", "nvidia.NVreg_DeviceFileGID=44",
        "nvidia.NVreg_NvLinkDisable=1"]
    assert "nvidia.NVreg_NvLinkDisable=1" not in modules.auto_params(Mode.GPU, 8, 0o666, 0)
    assert modules.auto_params(Mode.CPU, 0, 0o666, 0) == []


def test_mode_module_sets() -> None:
    gpu = accelerators("gpu", gpu_bdfs(1))
    assert modules.accel_modules(Mode.GPU, gpu, ["nvidia-drm"]) == ["nvidia", "nvidia_uvm",
                                                                 "nvidia_drm"]
    assert modules.accel_modules(Mode.NVL4, [], ["nvidia-drm"]) == ["nvidia"]
    assert modules.accel_modules(Mode.NVL5, [], []) == ["nvidia", "ib_umad", "mlx5_ib"]
    # GPUs with SW_MNG bridges (HGX B200): the NVL5 fabric's InfiniBand drivers too
    assert modules.accel_modules(Mode.GPU, gpu, [], fabric=Fabric.NVL5) == [
        "nvidia", "nvidia_uvm", "ib_umad", "mlx5_ib"]
    assert modules.accel_modules(Mode.GPU, gpu, [], fabric=Fabric.NVL4) == ["nvidia", "nvidia_uvm"]
    fpga = accelerators("generic", ["0000:05:00.0"], modules=("xdma", "qdma"))
    assert modules.accel_modules(Mode.CPU, fpga, []) == ["xdma", "qdma"]
