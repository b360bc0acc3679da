"""Sizes of memory as people write them, one meaning everywhere (--kv-memory, --max-memory).

    KiB MiB GiB TiB   binary: 2**10, 2**20, 2**30, 2**40 bytes
    K   M   G   T     binary too, the short spelling (as `free -g`, Docker and most tools)
    kB  MB  GB  TB    decimal: 10**3, 10**6, 10**9, 10**12 bytes (the SI prefixes, as disks)

Case does not matter; a plain number is bytes. So `8G` and `8GiB` are 8 GiB, `8GB` is 8*10**9
bytes (about 7.45 GiB). Sizes are printed in binary units (`format_size`).
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(text: str, option: str = "size") -> int:
    """'2GiB' -> 2147483648, '800MB' -> 800000000, '1.5G' -> 1610612736 (see the module
    docstring); ValueError naming `option` for anything else, or for a size of 0 bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(
            f"{option} {text!r}: give a size such as 2GiB, 512MiB, 1.5G or 800MB "
            "(K/M/G/T and KiB/MiB/GiB/TiB are binary, kB/MB/GB/TB decimal)"
        )
    number, prefix, binary, byte = match.groups()
    decimal = bool(prefix) and not binary and bool(byte)
    size = int(float(number) * (1000 if decimal else 1024) ** _POWERS[prefix.lower()])
    if size <= 0:
        raise ValueError(f"{option} {text!r} must be more than 0 bytes")
    return size


def format_size(n_bytes: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB, GiB at most."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n_bytes) < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    raise AssertionError("unreachable")
