"""The fabric manager's partition API (NVIDIA's libnvfm) in cffi's API mode (issue #25).

The service VM's partition service lists, activates and deactivates NVLink partitions
through this binding. ``build(dest, libdir)`` compiles the extension module
``_guestinit_nvfm`` ahead of time: cffi's C wrappers, checked by the compiler against
``fm_sdk.h`` (our declarations of the SDK's ABI, checked against NVIDIA's headers; see
there) and linked against ``libnvfm.so.1`` from ``libdir``. ``Fabric`` is the
Python side: one connection, typed results, and an error naming the call and the
SDK's return code when the fabric manager refuses.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:  # no typing, dataclasses or pathlib at import: this module is frozen in
    from collections.abc import Iterable
    from pathlib import Path
    from typing import Any

HEADER = os.path.join(os.path.dirname(__file__), "fm_sdk.h")
MODULE = "_guestinit_nvfm"
LIBRARY = "nvfm"  # libnvfm.so.1, the SDK's SONAME

CDEF = """
typedef int... fmReturn_t;
typedef void *fmHandle_t;
typedef unsigned int fmFabricPartitionId_t;
#define FM_MAX_FABRIC_PARTITIONS ...
#define FM_MAX_NUM_GPUS ...
#define FM_CMD_PORT_NUMBER ...
typedef struct { unsigned int version; char addressInfo[...]; unsigned int timeoutMs;
                 unsigned int addressIsUnixSocket; } fmConnectParams_t;
typedef struct { unsigned int physicalId; char uuid[...]; char pciBusId[...];
                 unsigned int numNvLinksAvailable; unsigned int maxNumNvLinks;
                 unsigned int nvlinkLineRateMBps; } fmFabricPartitionGpuInfo_t;
typedef struct { fmFabricPartitionId_t partitionId; unsigned int isActive;
                 unsigned int numGpus; fmFabricPartitionGpuInfo_t gpuInfo[...];
               } fmFabricPartitionInfo_t;
typedef struct { unsigned int version; unsigned int numPartitions;
                 unsigned int maxNumPartitions; fmFabricPartitionInfo_t partitionInfo[...];
               } fmFabricPartitionList_t;
typedef struct { unsigned int version; unsigned int numPartitions;
                 fmFabricPartitionId_t partitionIds[...]; } fmActivatedFabricPartitionList_t;
typedef struct { char uuid[...]; char pciBusId[...]; unsigned int numPorts;
                 unsigned int portNum[...]; } fmNvlinkFailedDeviceInfo_t;
typedef struct { unsigned int version; unsigned int numGpus; unsigned int numSwitches;
                 fmNvlinkFailedDeviceInfo_t gpuInfo[...];
                 fmNvlinkFailedDeviceInfo_t switchInfo[...]; } fmNvlinkFailedDevices_t;
typedef struct { fmFabricPartitionId_t partitionId; unsigned int numGpus;
                 unsigned int gpuPhysicalIds[...]; } fmUnsupportedFabricPartitionInfo_t;
typedef struct { unsigned int version; unsigned int numPartitions;
                 fmUnsupportedFabricPartitionInfo_t partitionInfo[...];
               } fmUnsupportedFabricPartitionList_t;
fmReturn_t fmLibInit(void);
fmReturn_t fmLibShutdown(void);
fmReturn_t fmConnect(fmConnectParams_t *, fmHandle_t *);
fmReturn_t fmDisconnect(fmHandle_t);
fmReturn_t fmGetSupportedFabricPartitions(fmHandle_t, fmFabricPartitionList_t *);
fmReturn_t fmActivateFabricPartition(fmHandle_t, fmFabricPartitionId_t);
fmReturn_t fmDeactivateFabricPartition(fmHandle_t, fmFabricPartitionId_t);
fmReturn_t fmSetActivatedFabricPartitions(fmHandle_t, fmActivatedFabricPartitionList_t *);
fmReturn_t fmGetNvlinkFailedDevices(fmHandle_t, fmNvlinkFailedDevices_t *);
fmReturn_t fmGetUnsupportedFabricPartitions(fmHandle_t, fmUnsupportedFabricPartitionList_t *);
"""

# fmReturn_t -> (name, what it means here), from nv_fm_types.h and nv_fm_agent.h
RETURNS: dict[int, tuple[str, str]] = {
    -1: ("FM_ST_BADPARAM", "bad parameter (an unknown partition id, or a bad address)"),
    -2: ("FM_ST_GENERIC_ERROR", "unspecified fabric manager error"),
    -3: ("FM_ST_NOT_SUPPORTED", "not supported or not enabled (is FABRIC_MODE=1, shared "
         "NVSwitch, set in the fabric manager's config?)"),
    -4: ("FM_ST_UNINITIALIZED", "not initialized, or the partition is not active"),
    -5: ("FM_ST_TIMEOUT", "timed out"),
    -6: ("FM_ST_VERSION_MISMATCH", "SDK structure version mismatch (library and caller "
         "from different fabric manager releases)"),
    -7: ("FM_ST_IN_USE", "in use: the partition is active, or shares GPUs with an "
         "active partition"),
    -8: ("FM_ST_NOT_CONFIGURED", "the fabric manager is initializing, or restarted and "
         "waits for the activated partition list"),
    -9: ("FM_ST_CONNECTION_NOT_VALID", "no connection to the fabric manager"),
    -10: ("FM_ST_NVLINK_ERROR", "NVLink error or training failure"),
}


class FabricError(Exception):
    """A libnvfm call failed: ``call``, ``code`` (fmReturn_t) and its meaning."""

    def __init__(self, call: str, code: int, detail: str = "") -> None:
        name, meaning = RETURNS.get(code, (f"fmReturn_t {code}", "unknown return code"))
        self.call, self.code, self.name = call, code, name
        super().__init__(f"{call}{detail}: {name}: {meaning}")


class Gpu:
    """A GPU of a partition, as fmFabricPartitionGpuInfo_t describes it."""

    __slots__ = ("bdf", "line_rate_mbps", "max_nvlinks", "nvlinks", "physical_id", "uuid")

    def __init__(self, physical_id: int, uuid: str, bdf: str, nvlinks: int,
                 max_nvlinks: int, line_rate_mbps: int) -> None:
        self.physical_id, self.uuid, self.bdf = physical_id, uuid, bdf
        self.nvlinks, self.max_nvlinks, self.line_rate_mbps = nvlinks, max_nvlinks, line_rate_mbps


class Partition:
    """A fabric partition: its id, whether it is active, its GPUs."""

    __slots__ = ("active", "gpus", "id")

    def __init__(self, pid: int, active: bool, gpus: tuple[Gpu, ...]) -> None:
        self.id, self.active, self.gpus = pid, active, gpus

    @property
    def nvlinks(self) -> int:
        return sum(g.nvlinks for g in self.gpus)


def build(dest: Path, libdir: Path, rpath: bool = True, cc: str = "gcc") -> Path:
    """Compile ``_guestinit_nvfm`` into ``dest`` against ``libdir``'s libnvfm.so.1 (with
    an rpath to ``libdir`` when ``rpath``: tests; an image finds it in the library
    path); the path of the extension module. cffi emits the C source (it needs pycparser:
    build time only); gcc builds it stripped, with no build id and ``dest`` mapped to
    ``.``, so equal inputs give equal bytes. A compiler error raises CalledProcessError."""
    import contextlib
    import io
    import pathlib
    import subprocess
    import sysconfig

    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, '#include "fm_sdk.h"')
    dest = pathlib.Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    source = dest / f"{MODULE}.c"
    with contextlib.redirect_stdout(io.StringIO()):  # its "generating PATH" line
        ffi.emit_c_code(str(source))
    out = dest / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-s", "-Wl,--build-id=none",
                    f"-ffile-prefix-map={dest}=.", f"-I{sysconfig.get_paths()['include']}",
                    f"-I{os.path.dirname(HEADER)}", "-o", str(out), str(source),
                    f"-L{libdir}", f"-l:lib{LIBRARY}.so.1",
                    *([f"-Wl,-rpath,{libdir}"] if rpath else [])],
                   check=True, capture_output=True, text=True)
    return out


def _text(raw: Any) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode(errors="replace")


class Fabric:
    """One connection to a fabric manager at ``address`` ("a.b.c.d[:port]" or, with
    ``unix``, a socket path)."""

    def __init__(self, address: str, unix: bool = False, timeout_ms: int = 5000,
                 module: Any = None) -> None:
        if module is None:
            import importlib

            module = importlib.import_module(MODULE)
        self.ffi, self.lib, self.address = module.ffi, module.lib, address
        rc = self.lib.fmLibInit()
        if rc not in (0, -7):  # IN_USE: another Fabric in this process initialized it
            raise FabricError("fmLibInit", rc)
        params = self.ffi.new("fmConnectParams_t *")
        params.version = self._version("fmConnectParams_t")
        encoded = address.encode()
        if len(encoded) >= len(params.addressInfo):
            raise FabricError("fmConnect", -1, f" {address!r}")
        params.addressInfo = encoded
        params.timeoutMs = timeout_ms
        params.addressIsUnixSocket = int(unix)
        handle = self.ffi.new("fmHandle_t *")
        self._call("fmConnect", self.lib.fmConnect(params, handle), f" to {address}")
        self.handle = handle[0]

    def _version(self, ctype: str) -> int:
        return int(self.ffi.sizeof(ctype) | (1 << 24))

    @staticmethod
    def _call(name: str, rc: int, detail: str = "") -> None:
        if rc != 0:
            raise FabricError(name, rc, detail)

    def close(self) -> None:
        if self.handle is not None:
            self.lib.fmDisconnect(self.handle)
            self.handle = None

    def __enter__(self) -> Fabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partitions(self) -> list[Partition]:
        out = self.ffi.new("fmFabricPartitionList_t *")
        out.version = self._version("fmFabricPartitionList_t")
        self._call("fmGetSupportedFabricPartitions",
                   self.lib.fmGetSupportedFabricPartitions(self.handle, out))
        parts = []
        for p in out.partitionInfo[0:out.numPartitions]:
            gpus = tuple(Gpu(g.physicalId, _text(self.ffi.buffer(g.uuid)),
                             _text(self.ffi.buffer(g.pciBusId)), g.numNvLinksAvailable,
                             g.maxNumNvLinks, g.nvlinkLineRateMBps)
                         for g in p.gpuInfo[0:p.numGpus])
            parts.append(Partition(p.partitionId, bool(p.isActive), gpus))
        return parts

    def activate(self, partition_id: int) -> None:
        self._call("fmActivateFabricPartition",
                   self.lib.fmActivateFabricPartition(self.handle, partition_id),
                   f" {partition_id}")

    def deactivate(self, partition_id: int) -> None:
        self._call("fmDeactivateFabricPartition",
                   self.lib.fmDeactivateFabricPartition(self.handle, partition_id),
                   f" {partition_id}")

    def set_activated(self, ids: Iterable[int]) -> None:
        wanted = list(ids)
        lst = self.ffi.new("fmActivatedFabricPartitionList_t *")
        if len(wanted) > len(lst.partitionIds):
            raise FabricError("fmSetActivatedFabricPartitions", -1, f" {wanted}")
        lst.version = self._version("fmActivatedFabricPartitionList_t")
        lst.numPartitions = len(wanted)
        for i, pid in enumerate(wanted):
            lst.partitionIds[i] = pid
        self._call("fmSetActivatedFabricPartitions",
                   self.lib.fmSetActivatedFabricPartitions(self.handle, lst), f" {wanted}")

    def unsupported(self) -> list[tuple[int, tuple[int, ...]]]:
        out = self.ffi.new("fmUnsupportedFabricPartitionList_t *")
        out.version = self._version("fmUnsupportedFabricPartitionList_t")
        self._call("fmGetUnsupportedFabricPartitions",
                   self.lib.fmGetUnsupportedFabricPartitions(self.handle, out))
        return [(p.partitionId, tuple(p.gpuPhysicalIds[0:p.numGpus]))
                for p in out.partitionInfo[0:out.numPartitions]]

    def nvlink_failed(self) -> list[tuple[str, str, str, tuple[int, ...]]]:
        """(gpu|switch, uuid, bdf, failed ports) per device with failed NVLinks."""
        out = self.ffi.new("fmNvlinkFailedDevices_t *")
        out.version = self._version("fmNvlinkFailedDevices_t")
        self._call("fmGetNvlinkFailedDevices", self.lib.fmGetNvlinkFailedDevices(self.handle, out))
        rows = []
        for kind, infos, n in (("gpu", out.gpuInfo, out.numGpus),
                               ("switch", out.switchInfo, out.numSwitches)):
            rows += [(kind, _text(self.ffi.buffer(d.uuid)), _text(self.ffi.buffer(d.pciBusId)),
                      tuple(d.portNum[0:d.numPorts])) for d in infos[0:n]]
        return rows
