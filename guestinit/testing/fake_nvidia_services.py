"""Stand-ins for the NVIDIA services packaged beside the driver: the fabric's
nv-fabricmanager and nvlsm, DCGM's nv-hostengine and dcgm-exporter (``fake_nvidia``
says how they behave and starts them). Stdlib only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from guestinit.testing.fake_nvidia_runtime import (
    VERSION,
    Syslog,
    behaviour,
    detach,
    driver_ok,
    gpus,
    rooted,
    sleep_forever,
)

# -- nv-fabricmanager ---------------------------------------------------------------


def fabricmanager(args: list[str]) -> int:
    if args in (["-v"], ["--version"]):
        print(f"Fabric Manager version is : {VERSION}")
        return 0
    restart = "--restart" in args  # Shared NVSwitch resiliency: a restarted instance
    args = [a for a in args if a != "--restart"]
    if len(args) != 2 or args[0] not in ("-c", "--config"):
        print("usage: nv-fabricmanager -c <config file> [--restart]", file=sys.stderr)
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
    cleanup = []
    if cfg.get("FABRIC_MODE", "0") == "1":  # Shared NVSwitch: the partition API (libnvfm)
        cleanup = _serve_partitions(cfg, restart or cfg.get("FABRIC_MODE_RESTART") == "1", log)
    if behaviour().get("fabricmanager") != "hang":
        log("Successfully configured all the available NVSwitches to route GPU NVLink "
            "traffic. NVLink Peer-to-Peer support will be enabled once the GPUs are "
            "successfully registered with the NVLink fabric.")
    sleep_forever(cleanup, syslog, False)
    return 0


def _serve_partitions(cfg: dict[str, str], restart: bool,
                      log: Callable[[str, int], None]) -> list[str]:
    """The fabric manager's API for libnvfm (``fake_fabric``), where its config says:
    FM_CMD_UNIX_SOCKET_PATH, else FM_CMD_BIND_INTERFACE:FM_CMD_PORT_NUMBER (127.0.0.1:6666
    by default, as nv-fabricmanager). Returns the paths to remove at exit."""
    from guestinit.testing import fake_fabric

    crash = behaviour().get("fabricmanager_crash_after_activations", "0")
    # the fault hits the first instance only: the supervisor's restart (--restart) stays up
    state = fake_fabric.FabricState(restart=restart,
                                    crash_after=0 if restart else int(crash))
    path = cfg.get("FM_CMD_UNIX_SOCKET_PATH", "")
    host = cfg.get("FM_CMD_BIND_INTERFACE", "127.0.0.1")
    port = int(cfg.get("FM_CMD_PORT_NUMBER", "6666"))
    where = path or f"{host}:{port}"
    try:
        if path:
            os.makedirs(os.path.dirname(rooted(path)), exist_ok=True)
            server = fake_fabric.Server.unix(state, rooted(path))
        else:
            server = fake_fabric.Server.tcp(state, host, port)
    except OSError as exc:  # e.g. no loopback in a test's network namespace
        log(f"Fabric Manager API interface cannot listen on {where}: {exc.strerror}", 3)
        return []
    server.start()
    log(f"Fabric Manager API interface listening on {where}"
        + (" (restarted: waiting for the activated partition list)" if restart else ""), 6)
    return [rooted(path)] if path else []


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
