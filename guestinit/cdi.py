"""The CDI spec for the GPUs found (``/var/run/cdi/nvidia.json``, cdiVersion 0.7.0).

One device per GPU by index and, when the driver reported one, by UUID, plus
``all``; the control nodes (nvidiactl, nvidia-uvm, nvidia-uvm-tools) go in the
spec-wide container edits, with ``additionalGids`` (new in 0.7.0) when the
nodes belong to a group. Written atomically (tmp + rename) so a reader never
sees half a spec.
"""

from __future__ import annotations

import os

from guestinit.stages import BootError, Stage

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from guestinit.boot import Boot

CDI_VERSION = "0.7.0"
KIND = "nvidia.com/gpu"
SPEC_PATH = "var/run/cdi/nvidia.json"


def _node(node: Mapping[str, object]) -> dict[str, object]:
    return {"path": node["path"], "type": "c", "major": node["major"], "minor": node["minor"],
            "permissions": "rw"}


def plan_spec(gpus: Sequence[Mapping[str, object]], control: Sequence[Mapping[str, object]],
              gid: int = 0) -> dict[str, object]:
    """The spec as a dict; ``gpus`` as ``boot.facts["gpus"]``, ``control`` as device maps."""
    devices: list[dict[str, object]] = []
    for gpu in gpus:
        node = gpu["node"]
        assert isinstance(node, dict)
        edits = {"deviceNodes": [_node(node)]}
        devices.append({"name": str(gpu["index"]), "containerEdits": edits})
        if gpu.get("uuid"):
            devices.append({"name": str(gpu["uuid"]), "containerEdits": edits})
    all_nodes = [_node(g["node"]) for g in gpus]  # type: ignore[arg-type]
    devices.append({"name": "all", "containerEdits": {"deviceNodes": all_nodes}})
    common: dict[str, object] = {"deviceNodes": [_node(n) for n in control]}
    if gid:
        common["additionalGids"] = [gid]
    return {"cdiVersion": CDI_VERSION, "kind": KIND, "devices": devices,
            "containerEdits": common}


def write_spec(path: str, spec: Mapping[str, object]) -> None:
    import json

    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=2, sort_keys=True)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.rename(tmp, path)


def run_cdi(boot: Boot) -> None:
    """Write the spec in gpu mode (other modes have no GPUs to describe), then ``smi.srs``."""
    gpus = boot.facts.get("gpus", [])
    nodes = boot.facts.get("device_nodes", {})
    assert isinstance(gpus, list) and isinstance(nodes, dict)
    if boot.facts.get("mode") != "gpu" or not gpus:
        return
    spec = plan_spec(gpus, nodes.get("control", []), boot.config().int("device.gid"))
    path = boot.path(SPEC_PATH)
    try:
        write_spec(path, spec)
    except OSError as exc:
        raise BootError(Stage.CDI, f"write CDI spec {path}: {exc.strerror or exc}") from None
    boot.facts["cdi"] = "/" + SPEC_PATH
    boot.kmsg.log(6, f"cdi: {len(gpus)} GPUs described in /{SPEC_PATH}")
    from guestinit import nvidia

    nvidia.set_ready_state(boot)
