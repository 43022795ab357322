"""parse() of syslog datagrams: RFC 3164, RFC 5424, plain text, bad bytes."""

from __future__ import annotations

from guestinit.syslog_parse import parse


def test_parse_rfc3164_with_timestamp_tag_and_pid() -> None:
    m = parse(b"<30>Nov 22 09:00:01 nvidia-persistenced[123]: Started (123)\n")
    assert (m.pri, m.tag, m.pid, m.text) == (30, "nvidia-persistenced", "123", "Started (123)")
    assert m.line() == "nvidia-persistenced[123]: Started (123)"


def test_parse_tag_without_pid_and_plain_messages() -> None:
    assert parse(b"<11>dcgm: hello").line() == "dcgm: hello"
    plain = parse(b"no priority at all")
    assert (plain.pri, plain.tag, plain.text) == (13, "", "no priority at all")
    assert parse(b"<3>two words: not a tag").line() == "two words: not a tag"
    # A priority out of range is text, not a priority.
    bad = parse(b"<999>x")
    assert (bad.pri, bad.text) == (13, "<999>x")


def test_parse_rfc5424() -> None:
    m = parse(b"<165>1 2026-11-22T09:00:00Z host app 42 ID47 - the message")
    assert (m.pri, m.tag, m.pid, m.text) == (165, "app", "42", "the message")
    sd = parse(b'<14>1 - - fm - - [x@1 a="b"] text')
    assert (sd.tag, sd.pid, sd.text) == ("fm", "", '[x@1 a="b"] text')


def test_parse_replaces_bad_utf8_and_escapes_controls() -> None:
    m = parse(b"<6>t: caf\xc3\xa9 \xff\xfe line1\nline2\r\x1b[31m\x00")
    assert m.text == "café \ufffd\ufffd line1\\nline2\\x0d\\x1b[31m"
    assert "\n" not in m.line()
