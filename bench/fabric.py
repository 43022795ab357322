"""``guestinit-fabric``: the host's controller for a service VM's NVLink partitions (#25).

    guestinit-fabric [--to URI] [--by NAME] [--json] list | status | activate ID | deactivate ID

Sends one ``request`` frame to the partition service in the service VM
(guestinit/nvidia/partitions.py) and prints its ``reply``: the partition table as
operators know it, the audit line of a change, or the service's error. URIs as
``guestinit-bench listen`` connects them: ``vsock:CID:PORT``,
``hvsock-connect:UDS:PORT`` (Firecracker / Cloud Hypervisor / Kata's hybrid vsock) and
``unix:PATH`` (a virtio-serial port's host socket, or a test's socket). The reply is
untrusted: it is read bounded and validated like every frame from a guest.

Exit status: 0 done, 1 the service refused (its reason printed), 2 bad usage or no
connection.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Sequence

from bench.listen import UriError, hvsock_connect
from guestinit import wire
from guestinit.wire import Frame, FrameError, FrameReader, FrameType

DEFAULT_URI = "vsock:3:1050"
TIMEOUT = 30.0  # s for the whole exchange (an activation trains NVLinks)
EXIT_REFUSED, EXIT_USAGE = 1, 2
HEADINGS = ("PARTITION ID", "STATUS", "GPUs", "NVLINKS", "GPU PHYSICAL IDs")


class FabricCliError(Exception):
    """No answer: the message says what to check."""


def connect(uri: str, timeout: float = TIMEOUT) -> socket.socket:
    kind, _, rest = uri.partition(":")
    try:
        if kind == "unix" and rest:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(rest)
            return sock
        if kind == "vsock":
            cid, _, port = rest.partition(":")
            if not (cid.isdigit() and port.isdigit()):
                raise FabricCliError(f"{uri}: want vsock:CID:PORT, e.g. vsock:3:1050")
            sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect((int(cid), int(port)))
            return sock
        if kind == "hvsock-connect":
            sock = hvsock_connect(uri)
            sock.settimeout(timeout)
            return sock
    except UriError as exc:
        raise FabricCliError(str(exc)) from None
    except OSError as exc:
        raise FabricCliError(f"{uri}: {exc.strerror or exc} (is the service VM up, and its "
                             "partition service listening there?)") from None
    raise FabricCliError(f"{uri}: want unix:PATH, vsock:CID:PORT or hvsock-connect:UDS:PORT")


def exchange(uri: str, request: Frame, timeout: float = TIMEOUT) -> Frame:
    """Send ``request``, return the validated reply (or FabricCliError)."""
    sock = connect(uri, timeout)
    deadline = time.monotonic() + timeout
    reader = FrameReader()
    try:
        sock.sendall(wire.encode(request))
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            items = reader.feed(data) if data else reader.eof()
            for item in items:
                if isinstance(item, FrameError):
                    raise FabricCliError(f"{uri}: malformed reply: {item}")
                if item.type is FrameType.REPLY:
                    return item
            if not data:
                raise FabricCliError(f"{uri}: the service closed the connection without "
                                     "a reply")
    except OSError as exc:
        raise FabricCliError(f"{uri}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    raise FabricCliError(f"{uri}: no reply within {timeout:g} s")


def render(parts: list[object]) -> str:
    rows = [HEADINGS]
    for p in parts:
        if not isinstance(p, dict):
            continue
        gpus = [g for g in p.get("gpus", []) if isinstance(g, int)]
        rows.append((str(p.get("id", "?")), "Active" if p.get("active") else "Inactive",
                     str(len(gpus)), str(p.get("nvlinks", "?")), ",".join(map(str, gpus))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADINGS) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]])
                     for r in rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guestinit-fabric", description="List, activate and "
                                "deactivate the NVLink partitions of a service VM.")
    p.add_argument("--to", default=DEFAULT_URI, metavar="URI",
                   help=f"the partition service (default {DEFAULT_URI})")
    p.add_argument("--by", default=None, metavar="NAME",
                   help="who asks, for the audit trail (default: user@host)")
    p.add_argument("--json", action="store_true", help="print the reply frame as JSON")
    p.add_argument("--timeout", type=float, default=TIMEOUT, metavar="S")
    sub = p.add_subparsers(dest="op", required=True)
    sub.add_parser("list", help="the partitions and which are active")
    sub.add_parser("status", help="the partitions and the recent audit events")
    for op in ("activate", "deactivate"):
        sub.add_parser(op, help=f"{op} a partition").add_argument("id", type=int)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    by = args.by or f"{getpass.getuser()}@{os.uname().nodename}"
    fields: dict[str, object] = {"op": args.op, "by": by}
    if args.op in ("activate", "deactivate"):
        fields["id"] = args.id
    request = Frame(FrameType.REQUEST, "guestinit-fabric", time.monotonic_ns(), fields)
    try:
        answer = exchange(args.to, request, args.timeout)
    except FabricCliError as exc:
        print(f"guestinit-fabric: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(answer.fields, sort_keys=True))
    if answer.get("status") != "ok":
        print(f"guestinit-fabric: {args.op}: {answer.get('error')}", file=sys.stderr)
        return EXIT_REFUSED
    if not args.json:
        raw = answer.get("audit")
        audit = [str(a) for a in raw] if isinstance(raw, list) else []
        if args.op in ("activate", "deactivate"):
            print("\n".join(audit))
        parts = answer.get("partitions")
        if isinstance(parts, list):
            print(render(parts))
        if args.op == "status":
            print("\n".join(f"audit: {line}" for line in audit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
