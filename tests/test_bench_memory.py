"""bench.memory's readers of /proc text and of the master's stats line."""

from pathlib import Path

from bench.memory import decode_seconds, mapping_kind, parse_smaps, parse_smaps_rollup

ROLLUP = """\
5559eb44a000-7ffc24b7b000 ---p 00000000 00:00 0                          [rollup]
Rss:                1700 kB
Pss:                 505 kB
Pss_Anon:            108 kB
Pss_File:            397 kB
THPeligible:           0
"""

SMAPS = """\
560bdaf4d000-560bdaf4f000 r--p 00000000 fe:00 260386                     /usr/bin/python3
Rss:                   8 kB
Pss:                   8 kB
Pss_Dirty:             0 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Pss:                1024 kB
7f0000100000-7f0000200000 rw-p 00000000 00:00 0                          [heap]
Pss:                   4 kB
7f0000200000-7f0000300000 r--s 00000000 fe:00 12                         /c/weights/ab/blocks.bin
Pss:                 512 kB
7f0000300000-7f0000400000 r--s 00000000 fe:00 13                         /m/model.gguf
Pss:                 256 kB
VmFlags: rd mr mw me
"""


def test_rollup_fields_in_bytes() -> None:
    fields = parse_smaps_rollup(ROLLUP)
    assert fields == {
        "Rss": 1700 << 10,
        "Pss": 505 << 10,
        "Pss_Anon": 108 << 10,
        "Pss_File": 397 << 10,
    }
    assert fields["Pss"] == fields["Pss_Anon"] + fields["Pss_File"]


def test_smaps_split_by_mapping_adds_up() -> None:
    split = parse_smaps(SMAPS, mapping_kind(Path("/m/model.gguf"), Path("/c/weights")))
    assert split == {
        "other files": 8 << 10,
        "anonymous": (1024 + 4) << 10,
        "weight cache": 512 << 10,
        "GGUF file": 256 << 10,
    }


def test_decode_seconds_from_the_stats_line() -> None:
    line = "prompt tokens: 21, new tokens: 48, prefill: 9.1 tok/s, decode: 4.0 tok/s, round trips"
    assert decode_seconds(line) == 47 / 4.0
    assert (
        decode_seconds("prompt tokens: 21, new tokens: 1, prefill: 33.1 tok/s, decode: 0.0 tok/s")
        == 0.0
    )
    assert decode_seconds("[00:26:50 INFO cake.master] master runs head int4/g32") is None
