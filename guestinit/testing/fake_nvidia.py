"""Stand-ins for NVIDIA's userspace: persistenced, nvidia-smi, fabric manager, DCGM.

One file, installed under each program's name (``nvidia_bundle.install``); it acts
as the program it was started as. Stdlib only: it runs as ``python3 -IS`` from a
tmp root, where guestinit is not importable. On the interfaces the init uses they
behave like the real ones:

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

The root (a tmp dir in tests, "/" in a VM) is the nearest ancestor of this file
holding ``etc/fake-nvidia``. ``etc/fake-nvidia/behaviour`` (``key=value`` lines)
injects faults: ``persistenced=hang|crash``, ``fabricmanager=hang``, ``hostengine=hang``,
``smi=fail``, ``gpu_delay=SECONDS`` (per GPU registration). Every start is
appended to ``etc/fake-nvidia/calls.log``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time

VERSION = "550.54.15"


def find_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    while True:
        if os.path.isdir(os.path.join(here, "etc", "fake-nvidia")):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            return "/"
        here = parent


ROOT = find_root()


def rooted(path: str) -> str:
    return os.path.join(ROOT, path.lstrip("/"))


def behaviour() -> dict[str, str]:
    out = {}
    try:
        with open(rooted("etc/fake-nvidia/behaviour")) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    out[key.strip()] = value.strip()
    except FileNotFoundError:
        pass
    return out


def record(prog: str, argv: list[str]) -> None:
    try:
        with open(rooted("etc/fake-nvidia/calls.log"), "a") as f:
            f.write(" ".join([prog, *argv]) + "\n")
    except OSError:
        pass


class Syslog:
    """syslog(3) over a datagram to /dev/log: ``<PRI>Mmm dd hh:mm:ss tag[pid]: text``."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __call__(self, text: str, pri: int = 6, facility: int = 3) -> None:
        stamp = time.strftime("%b %e %H:%M:%S")
        data = f"<{facility * 8 + pri}>{stamp} {self.tag}[{os.getpid()}]: {text}".encode()
        with contextlib.suppress(OSError):  # like syslog(3): no logger, no message
            self.sock.sendto(data, rooted("/dev/log"))


def gpus() -> list[tuple[str, dict[str, str]]]:
    base = rooted("/proc/driver/nvidia/gpus")
    out = []
    for bdf in sorted(os.listdir(base)):
        info = {}
        with open(os.path.join(base, bdf, "information")) as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    info[key.strip()] = value.strip()
        out.append((bdf, info))
    return out


def driver_ok() -> bool:
    return os.path.exists(rooted("/dev/nvidiactl")) and os.path.isdir(
        rooted("/proc/driver/nvidia/gpus"))


def detach() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()


def sleep_forever(cleanup: list[str], log: Syslog, verbose: bool) -> None:
    def stop(signum: int, _frame: object) -> None:
        if verbose:
            log(f"Received signal {signum}", pri=7)
        for path in cleanup:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log(f"Shutdown ({os.getpid()})")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        signal.pause()


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


# -- nv-fabricmanager ---------------------------------------------------------------


def fabricmanager(args: list[str]) -> int:
    if args in (["-v"], ["--version"]):
        print(f"Fabric Manager version is : {VERSION}")
        return 0
    if len(args) != 2 or args[0] not in ("-c", "--config"):
        print("usage: nv-fabricmanager -c <config file>", file=sys.stderr)
        return 1
    try:
        with open(rooted(args[1])) as f:
            text = f.read()
    except OSError as exc:
        print(f"failed to open config file {args[1]}: {exc.strerror}", file=sys.stderr)
        return 1
    cfg = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            cfg[key.strip()] = value.strip()
    if cfg.get("FABRIC_MODE", "0") not in ("0", "1", "2"):
        print(f"invalid FABRIC_MODE {cfg['FABRIC_MODE']} in {args[1]}", file=sys.stderr)
        return 1
    if cfg.get("DAEMONIZE", "1") == "1":
        detach()
    syslog = Syslog("nv-fabricmanager")

    def log(text: str, pri: int = 6) -> None:
        if cfg.get("LOG_USE_SYSLOG", "0") == "1":
            syslog(text, pri)
        elif cfg.get("LOG_FILE_NAME"):
            with open(rooted(cfg["LOG_FILE_NAME"]), "a") as f:
                f.write(f"[{time.strftime('%b %d %Y %H:%M:%S')}] [INFO] [tid {os.getpid()}] "
                        f"{text}\n")

    log(f"Fabric Manager version {VERSION} is running with the following configuration "
        f"options")
    log(f"FABRIC_MODE : {cfg.get('FABRIC_MODE', '0')}")
    switches = [n for n in os.listdir(rooted("/dev"))
                if n.startswith("nvidia-nvswitch") and n[15:].isdigit()]
    guid = cfg.get("FM_SM_MGMT_PORT_GUID", "")
    if guid:  # NVL5: the fabric is reached through the SW_MNG port nvlsm manages
        log(f"FM_SM_MGMT_PORT_GUID : {guid}")
        switches = [guid]
    if not switches:
        log("request to query NVSwitch device information from NVSwitch driver failed with "
            "error: NVSwitch devices not found", pri=3)
        return 1
    log("Connected to 1 node.")
    if behaviour().get("fabricmanager") != "hang":
        log("Successfully configured all the available NVSwitches to route GPU NVLink "
            "traffic. NVLink Peer-to-Peer support will be enabled once the GPUs are "
            "successfully registered with the NVLink fabric.")
    sleep_forever([], syslog, False)
    return 0


# -- nvlsm (NVL5 subnet manager) ---------------------------------------------------------


def nvlsm(args: list[str]) -> int:
    opts = _options(args, ("-F", "-g"), (), "nvlsm")
    if opts is None or "-g" not in opts:
        print("nvlsm: usage: nvlsm -F CONFIG -g PORT_GUID", file=sys.stderr)
        return 1
    log = Syslog("nvlsm")
    ports = rooted("/sys/class/infiniband")
    known = []
    for name in sorted(os.listdir(ports)) if os.path.isdir(ports) else []:
        with contextlib.suppress(OSError), open(
                os.path.join(ports, name, "ports", "1", "gids", "0")) as f:
            known.append("0x" + "".join(f.read().strip().split(":")[4:]))
    if opts["-g"] not in known:
        log(f"ERR: port GUID {opts['-g']} not found", pri=3)
        return 1
    log(f"Using port GUID {opts['-g']}")
    log("SUBNET UP")
    sleep_forever([], log, False)
    return 0


# -- DCGM: nv-hostengine and dcgm-exporter -----------------------------------------------


def _options(args: list[str], with_value: tuple[str, ...], flags: tuple[str, ...],
             prog: str) -> dict[str, str] | None:
    opts: dict[str, str] = {}
    it = iter(args)
    for arg in it:
        if arg in flags:
            opts[arg] = "1"
        elif arg in with_value:
            value = next(it, None)
            if value is None:
                print(f"{prog}: option {arg} needs a value", file=sys.stderr)
                return None
            opts[arg] = value
        else:
            print(f"{prog}: unknown option {arg}", file=sys.stderr)
            return None
    return opts


def _listen(port: int) -> socket.socket:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(16)
    return server


def hostengine(args: list[str]) -> int:
    opts = _options(args, ("--service-account", "--home-dir", "-p", "--port"), ("-n",),
                    "nv-hostengine")
    if opts is None:
        return 1
    if not driver_ok():
        print("Err: Failed to start DCGM Server: -16 (the NVIDIA driver is not loaded)")
        return 255
    port = int(opts.get("-p", opts.get("--port", "5555")))
    if "-n" not in opts:
        detach()
    if behaviour().get("hostengine") == "hang":
        sleep_forever([], Syslog("nv-hostengine"), False)
    server = _listen(port)
    print(f"Started host engine version 3.3.5 using port number: {port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        conn, _ = server.accept()
        conn.close()


def exporter(args: list[str]) -> int:
    opts = _options(args, ("-a", "--address", "-r", "--remote-hostengine-info", "-f"),
                    ("-k", "--kubernetes"), "dcgm-exporter")
    if opts is None:
        return 1
    remote = opts.get("-r", opts.get("--remote-hostengine-info", ""))
    if remote:
        host, _, rport = remote.rpartition(":")
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:  # not create_connection: getaddrinfo wants the idna codec the image leaves out
            probe.settimeout(2)
            probe.connect((host or "127.0.0.1", int(rport)))
        except (OSError, ValueError):
            print(f'level=fatal msg="Error connecting to nv-hostengine at {remote}"',
                  file=sys.stderr)
            return 1
        finally:
            probe.close()
    address = opts.get("-a", opts.get("--address", ":9400"))
    port = int(address.rpartition(":")[2])
    found = gpus() if driver_ok() else []
    server = _listen(port)
    print(f'level=info msg="Starting webserver" address="{address}"', flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    lines = ["# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).",
             "# TYPE DCGM_FI_DEV_GPU_TEMP gauge"]
    for i, (bdf, info) in enumerate(found):
        lines.append(f'DCGM_FI_DEV_GPU_TEMP{{gpu="{i}",UUID="{info.get("GPU UUID", "")}",'
                     f'pci_bus_id="{bdf}"}} 31')
    body = ("\n".join(lines) + "\n").encode()
    while True:
        conn, _ = server.accept()
        with conn:
            request = conn.recv(4096)
            ok = request.startswith(b"GET /metrics ")
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    if ok else b"HTTP/1.1 404 Not Found\r\n")
            payload = body if ok else b""
            conn.sendall(head + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)


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
