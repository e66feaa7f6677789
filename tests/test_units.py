"""Byte and FLOP units (dbprofile.units): the one place numbers get a unit."""

import pytest

from dbprofile.units import GiB, MiB, format_bytes, format_duration, format_gflop, parse_size, pick_unit


def test_iec_units_and_the_unit_a_table_picks():
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(1023) == "1023 B"
    assert format_bytes(3 * GiB, "MiB") == "3072.00 MiB"
    assert pick_unit(5 * MiB) == "MiB" and pick_unit(10, smallest="B") == "B" and pick_unit(10) == "KiB"


def test_sizes_the_user_writes():
    assert parse_size("24GiB") == 24 * GiB and parse_size("512 MiB") == 512 * MiB
    assert parse_size("80GB") == 80 * 10**9 and parse_size("1073741824") == GiB
    with pytest.raises(ValueError, match="write it like 24GiB"):
        parse_size("lots")


def test_gflop_is_readable_at_every_scale():
    # A tiny model's work per sample was shown as "0.0" GFLOP in the plan table and the verdict.
    assert format_gflop(1_234.5e9) == "1,234.5"
    assert format_gflop(12.34e9) == "12.3"
    assert format_gflop(3.21e9) == "3.21"
    assert format_gflop(12.3e6) == "0.0123"


def test_durations_read_in_their_unit():
    # The plan's "time per million samples" said "0.00 h" for every technique of a tiny model.
    assert format_duration(2.0) == "2 s" and format_duration(45.25) == "45.2 s"
    assert format_duration(750) == "12.5 min" and format_duration(12_240) == "3.40 h"
