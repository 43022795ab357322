"""Sizes and BAR targets as settings and the bar-map tools spell them."""

from __future__ import annotations

import pytest

from guestinit.sizes import format_size, parse_size, parse_target

MIB = 1 << 20


def test_sizes_parse_in_binary_units_and_print_back() -> None:
    assert [parse_size(t) for t in ("0", "4096", "4K", "512M", "64G", "1T", "2GiB", "8mb")] == [
        0, 4096, 4096, 512 * MIB, 64 << 30, 1 << 40, 2 << 30, 8 * MIB]
    assert [format_size(n) for n in (0, 256, 1536 * 1024, 4 << 30, 1 << 40)] == [
        "0 B", "256 B", "1536 KiB", "4 GiB", "1 TiB"]
    for bad in ("", "G", "1.5G", "-1G", "4X", "four"):
        with pytest.raises(ValueError, match="expected a whole number"):
            parse_size(bad)


def test_bar_targets_take_a_bdf_and_a_bar_index() -> None:
    assert parse_target("0000:00:01.0:2") == ("0000:00:01.0", 2)
    assert parse_target("00:01.0:2") == ("0000:00:01.0", 2)  # domain 0000 implied
    assert parse_target("0000:3B:00.0/resource1") == ("0000:3b:00.0", 1)
    for bad in ("0000:00:01.0", "0000:00:01.0:6", "zz:01.0:1", "1:2", ""):
        with pytest.raises(ValueError, match="expected <bdf>:<bar>"):
            parse_target(bad)
