"""Stand-ins for NVIDIA's userspace: persistenced, nvidia-smi, fabric manager, DCGM.

Started under each program's name (``nvidia_bundle.install`` puts a launcher there),
it acts as the program it was started as: the driver's own programs are here, the
fabric and DCGM services in ``fake_nvidia_services``, what all of them share (root,
behaviour, syslog, daemon helpers) in ``fake_nvidia_runtime``. Stdlib only: they run
as ``python3 -IS`` from a tmp root, with only their own directory importable. On the
interfaces the init uses they behave like the real ones:

- nvidia-persistenced: the options of the real option table; detaches unless
  ``--foreground``; needs ``/dev/nvidiactl`` and the driver's
  ``/proc/driver/nvidia/gpus``; logs to syslog (``/dev/log``) with the real
  texts ("Started (PID)", "device BDF - registered", with ``--verbose``
  "device BDF - persistence mode enabled." and "Local RPC services initialized"
  once its socket ``/var/run/nvidia-persistenced/socket`` and pid file exist);
  SIGTERM removes both and exits 0.
- nvidia-smi: ``-L``, ``-lgc``, ``-lmc``, ``-pl``, ``conf-compute -srs``; exit 9
  when it cannot talk to the driver, 2 on bad arguments, messages as the real one.
- nv-fabricmanager: ``-c CFG``; honours DAEMONIZE, LOG_USE_SYSLOG/LOG_FILE_NAME,
  FABRIC_MODE; needs ``/dev/nvidia-nvswitch*``; logs "Successfully configured all
  the available NVSwitches ..." when done.
- nvlsm: ``-F CFG -g GUID``; the GUID must be port 1 of a device under
  /sys/class/infiniband; logs "SUBNET UP". nv-fabricmanager with
  ``FM_SM_MGMT_PORT_GUID`` (NVL5) needs no NVSwitch nodes.
- nv-hostengine: ``-n`` (stay in the foreground, else detach), ``--service-account``,
  ``--home-dir``, ``-p PORT``; needs the driver; listens on 127.0.0.1:PORT and prints
  "Started host engine version ... using port number: PORT".
- dcgm-exporter: ``-k``, ``-a [HOST]:PORT``, ``-r HOST:PORT``; exits 1 when the remote
  host engine does not answer; serves ``GET /metrics`` (DCGM_FI_DEV_* gauges per GPU,
  Prometheus text) on PORT.

The root (a tmp dir in tests, "/" in a VM) is the nearest ancestor of these files
holding ``etc/fake-nvidia``. ``etc/fake-nvidia/behaviour`` (``key=value`` lines)
injects faults: ``persistenced=hang|crash``, ``fabricmanager=hang``, ``hostengine=hang``,
``smi=fail``, ``gpu_delay=SECONDS`` (per GPU registration),
``fabricmanager_crash_after_activations=N`` (nv-fabricmanager dies after answering its
Nth partition activation, unless started with ``--restart``). Every start is
appended to ``etc/fake-nvidia/calls.log``.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from guestinit.testing.fake_nvidia_runtime import (
    VERSION,
    Syslog,
    behaviour,
    detach,
    driver_ok,
    gpus,
    record,
    rooted,
    sleep_forever,
)
from guestinit.testing.fake_nvidia_services import exporter, fabricmanager, hostengine, nvlsm

# -- nvidia-persistenced ------------------------------------------------------------


def persistenced(args: list[str]) -> int:
    opts = {"verbose": False, "foreground": False, "persistence": True, "uvm": False,
            "user": "", "group": ""}
    it = iter(args)
    for arg in it:
        if arg in ("-v", "--version"):
            print(f"nvidia-persistenced:  version {VERSION}")
            return 0
        if arg in ("-V", "--verbose"):
            opts["verbose"] = True
        elif arg in ("-f", "--foreground"):
            opts["foreground"] = True
        elif arg in ("--persistence-mode", "--no-persistence-mode"):
            opts["persistence"] = arg == "--persistence-mode"
        elif arg in ("--uvm-persistence-mode", "--no-uvm-persistence-mode"):
            opts["uvm"] = arg == "--uvm-persistence-mode"
        elif arg in ("-u", "--user", "-g", "--group", "--nvidia-cfg-path"):
            value = next(it, None)
            if value is None:
                print(f"nvidia-persistenced: Option '{arg}' requires an argument.",
                      file=sys.stderr)
                return 1
            if arg in ("-u", "--user", "-g", "--group"):
                opts["user" if arg in ("-u", "--user") else "group"] = value
        else:
            print(f"nvidia-persistenced: Unrecognized option: '{arg}'", file=sys.stderr)
            return 1
    mode = behaviour()
    verbose = bool(opts["verbose"])
    if not opts["foreground"]:
        detach()
    log = Syslog("nvidia-persistenced")
    if verbose:
        log("Verbose syslog connection opened")
    if opts["user"]:
        ids = None
        with open(rooted("/etc/passwd")) as f:
            for line in f:
                fields = line.split(":")
                if fields[0] == opts["user"]:
                    ids = (fields[2], fields[3])
        if ids is None:
            log(f"Failed to find user ID for user '{opts['user']}'", pri=3)
            return 1
        if verbose:
            log(f"Now running with user ID {ids[0]} and group ID {ids[1]}")
    log(f"Started ({os.getpid()})")
    if not driver_ok():
        log("Failed to query NVIDIA devices. Please ensure that the NVIDIA device files "
            "(/dev/nvidia*) exist, and that user 0 has read and write permissions for "
            "those files.", pri=3)
        return 1
    if mode.get("persistenced") == "crash":
        log("Failed to initialize the NVIDIA Configuration Library: Unknown Error", pri=3)
        return 1
    delay = float(mode.get("gpu_delay", "0.02"))
    for bdf, _info in gpus():
        time.sleep(delay)
        log(f"device {bdf} - registered")
        if verbose and opts["persistence"]:
            log(f"device {bdf} - persistence mode enabled.", pri=5)
        if verbose and opts["uvm"]:
            log(f"device {bdf} - UVM persistence mode enabled.", pri=5)
    run_dir = rooted("/var/run/nvidia-persistenced")
    if mode.get("persistenced") == "hang":
        sleep_forever([], log, verbose)
    os.makedirs(run_dir, exist_ok=True)
    pid_file = os.path.join(run_dir, "nvidia-persistenced.pid")
    with open(pid_file, "w") as f:
        f.write(f"{os.getpid()}\n")
    sock_path = os.path.join(run_dir, "socket")
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(8)
    if verbose:
        log("Local RPC services initialized")
    sleep_forever([sock_path, pid_file], log, verbose)
    return 0


# -- nvidia-smi ---------------------------------------------------------------------

NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")
BAD_ARGS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."


def _pair(value: str) -> tuple[int, int] | None:
    lo, sep, hi = value.partition(",")
    if not sep:  # one clock: locked at it
        hi = lo
    if not lo.strip().isdigit() or not hi.strip().isdigit():
        return None
    return (int(lo), int(hi)) if int(lo) <= int(hi) else None


def smi(args: list[str]) -> int:
    if args in (["-h"], ["--help"]):
        print("NVIDIA System Management Interface -- v" + VERSION)
        return 0
    if not driver_ok():
        print(NO_DRIVER)
        return 9
    if behaviour().get("smi") == "fail":
        print("Unable to determine the device handle for GPU0000:18:00.0: Unknown Error")
        return 15
    found = gpus()
    bus = ["0000" + bdf for bdf, _ in found]  # nvidia-smi prints 8-digit PCI domains
    if args == ["-L"]:
        for i, (_, info) in enumerate(found):
            print(f"GPU {i}: {info.get('Model', 'NVIDIA')} (UUID: {info.get('GPU UUID', '')})")
        return 0
    if len(args) == 2 and args[0] in ("-lgc", "--lock-gpu-clocks", "-lmc",
                                      "--lock-memory-clocks"):
        pair = _pair(args[1])
        if pair is None:
            print(BAD_ARGS)
            return 2
        gpu_clocks = args[0] in ("-lgc", "--lock-gpu-clocks")
        what, lo, hi = ("GPU", "gpuClkMin", "gpuClkMax") if gpu_clocks else \
            ("Memory", "memClkMin", "memClkMax")
        for b in bus:
            print(f'{what} clocks set to "({lo} {pair[0]}, {hi} {pair[1]})" for GPU {b}')
        print("All done.")
        return 0
    if len(args) == 2 and args[0] in ("-pl", "--power-limit"):
        try:
            watts = float(args[1])
        except ValueError:
            print(BAD_ARGS)
            return 2
        for b in bus:
            if not 100.0 <= watts <= 700.0:
                print(f"Provided power limit {watts:.2f} W is not a valid power limit which "
                      f"should be between 100.00 W and 700.00 W for GPU {b}")
                return 2
            print(f"Power limit for GPU {b} was set to {watts:.2f} W from 700.00 W.")
        print("All done.")
        return 0
    if len(args) == 3 and args[:2] == ["conf-compute", "-srs"]:
        if args[2] not in ("0", "1"):
            print(BAD_ARGS)
            return 2
        print("Confidential Compute GPUs Ready state: " +
              ("ready" if args[2] == "1" else "not-ready"))
        return 0
    print(BAD_ARGS)
    return 2


PROGRAMS = {"nvidia-persistenced": persistenced, "nvidia-smi": smi,
            "nv-fabricmanager": fabricmanager, "nvlsm": nvlsm, "nv-hostengine": hostengine,
            "dcgm-exporter": exporter}


def main() -> int:
    prog = os.path.basename(sys.argv[0])
    record(prog, sys.argv[1:])
    if prog not in PROGRAMS:
        print(f"fake_nvidia: install me as one of {', '.join(PROGRAMS)}", file=sys.stderr)
        return 2
    return PROGRAMS[prog](sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
