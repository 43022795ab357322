"""Parse one syslog datagram (RFC 3164, RFC 5424 or plain text) into a ``Message``.

Pure and lenient: any bytes give a message, nothing is raised and nothing is written;
the server in ``guestinit.syslog`` decides what to keep, store and forward.
"""

from __future__ import annotations

DEFAULT_PRI = 13  # user.notice, RFC 3164 section 4.3.3

SEVERITY = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# C0 controls other than tab would break the one-line-per-record store and the console.
_ESCAPES: dict[int, str | None] = {c: f"\\x{c:02x}" for c in range(32) if c != 9}
_ESCAPES[10] = "\\n"
_ESCAPES[0] = None  # NULs (some loggers terminate with one) are dropped


class Message:
    """One parsed datagram: ``pri``, ``tag`` (may be ""), ``pid`` (may be ""), ``text``."""

    __slots__ = ("pid", "pri", "tag", "text")

    def __init__(self, pri: int, tag: str, pid: str, text: str) -> None:
        self.pri = pri
        self.tag = tag
        self.pid = pid
        self.text = text

    def line(self) -> str:
        """``tag[pid]: text`` (what is searched, stored and forwarded)."""
        if not self.tag:
            return self.text
        return f"{self.tag}[{self.pid}]: {self.text}" if self.pid else f"{self.tag}: {self.text}"


def _strip_rfc3164_time(rest: str) -> str:
    # "Mmm dd hh:mm:ss " (dd space-padded), as glibc's syslog() sends it.
    if len(rest) >= 16 and rest[:3] in _MONTHS and rest[3] == " " and rest[15] == " " \
            and rest[9] == ":" and rest[12] == ":":
        return rest[16:]
    return rest


def _split_tag(rest: str) -> tuple[str, str, str]:
    # "TAG[PID]: MSG" or "TAG: MSG"; a tag has no spaces and is at most 48 chars.
    colon = rest.find(": ", 0, 64)
    if colon <= 0:
        return "", "", rest
    head = rest[:colon]
    if " " in head:
        return "", "", rest
    pid = ""
    if head.endswith("]") and "[" in head:
        head, _, pid = head[:-1].partition("[")
        if not pid.isdigit():
            return "", "", rest
    if not head or len(head) > 48:
        return "", "", rest
    return head, pid, rest[colon + 2:]


def _parse_rfc5424(pri: int, rest: str) -> Message | None:
    # After "<PRI>1 ": "TIMESTAMP HOST APP PROCID MSGID SD MSG"; an SD of "-" is
    # dropped, a structured one ("[id k=v]") stays in the text.
    parts = rest.split(" ", 5)
    if len(parts) < 5:
        return None
    app = "" if parts[2] == "-" else parts[2]
    pid = parts[3] if parts[3].isdigit() else ""
    tail = parts[5] if len(parts) == 6 else ""
    if tail == "-":
        tail = ""
    elif tail.startswith("- "):
        tail = tail[2:]
    return Message(pri, app, pid, tail.removeprefix("\ufeff"))


def parse(data: bytes) -> Message:
    """Lenient parse of one datagram: ``<PRI>[TIMESTAMP ]TAG[PID]: MSG``, RFC 5424,
    or plain ``<PRI>MSG`` / ``MSG``; invalid UTF-8 is replaced, controls escaped."""
    text = data.decode("utf-8", "replace").rstrip("\n\0").translate(_ESCAPES)
    pri = DEFAULT_PRI
    rest = text
    if text.startswith("<"):
        end = text.find(">", 1, 5)
        digits = text[1:end] if end > 0 else ""
        if digits.isdigit() and int(digits) <= 191:
            pri = int(digits)
            rest = text[end + 1:]
    if rest.startswith("1 "):
        msg = _parse_rfc5424(pri, rest[2:])
        if msg is not None:
            return msg
    tag, pid, body = _split_tag(_strip_rfc3164_time(rest))
    return Message(pri, tag, pid, body)
