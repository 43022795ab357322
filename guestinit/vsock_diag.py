"""Who listens on which vsock port: the kernel's vsock sock_diag, as ``ss --vsock`` asks.

A NETLINK_SOCK_DIAG dump for AF_VSOCK (<linux/sock_diag.h>, <linux/vm_sockets_diag.h>;
the kernel's ``vsock_diag``, CONFIG_VSOCKETS_DIAG) lists every vsock socket with its
state; a listening stream socket is state TCP_LISTEN on its local port. The kernel
announces no listen(), so whoever waits for one asks again (readiness.py).
"""

from __future__ import annotations

import _socket as socket  # socket.py would import enum and selectors (boot path)
import errno
import struct

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_REQ = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_MSG = struct.Struct("=BBBBIIIII")  # family, type, state, shutdown, src cid/port, dst cid/port, ino


def request(seq: int = 1) -> bytes:
    body = _REQ.pack(socket.AF_VSOCK, 0, 0, 1 << TCP_LISTEN, 0, 0, 0, 0)
    return _NLMSG.pack(_NLMSG.size + len(body), SOCK_DIAG_BY_FAMILY,
                       NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def parse(data: bytes) -> tuple[set[int], bool]:
    """(ports of listening stream sockets, whether the dump is complete) of one reply
    datagram; OSError for a netlink error (ENOENT: the kernel has no vsock diag)."""
    ports: set[int] = set()
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            break
        if kind == NLMSG_DONE:
            return ports, True
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, off + _NLMSG.size)
            if code:
                raise OSError(-code, "vsock sock_diag: " + (
                    "the kernel has no vsock diag (CONFIG_VSOCKETS_DIAG, module vsock_diag)"
                    if -code == errno.ENOENT else f"netlink error {-code}"))
            return ports, True
        if kind == SOCK_DIAG_BY_FAMILY and off + _NLMSG.size + _MSG.size <= len(data):
            _fam, stype, state, _shut, _scid, sport, _dcid, _dport, _ino = _MSG.unpack_from(
                data, off + _NLMSG.size)
            if stype == socket.SOCK_STREAM and state == TCP_LISTEN:
                ports.add(sport)
        off += (length + 3) & ~3
    return ports, False


def listening_ports() -> set[int]:
    """The vsock ports with a listening stream socket, now."""
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                       NETLINK_SOCK_DIAG)
    try:
        nl.settimeout(1.0)
        nl.sendto(request(), (0, 0))
        ports: set[int] = set()
        while True:
            found, done = parse(nl.recv(65536))
            ports |= found
            if done:
                return ports
    finally:
        nl.close()
