"""The packed-weight cache's folder, its bound, and this process's settings.

Layout: `<cache>/weights/<source fingerprint>/<part>-<key>.safetensors`, one folder per source
file (with `source.txt` naming it, for `--cache-info`), one entry per block and one for the
head (parts.py says what the key holds).

Bound: `--weight-cache-size`, by default DEFAULT_SHARE of the disk that holds the cache. After
each write the least recently used entries (by mtime, which a hit refreshes) are removed until
the cache is within its bound; entries this process uses are never removed under it, and when
they alone exceed the bound, writing stops with one warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from cake.host.cache import cache_root
from cake.host.sizes import format_size

log = logging.getLogger("cake.weight_cache")

DEFAULT_SHARE = 0.25  # of the disk that holds the cache, when --weight-cache-size is not given
ENTRY_SUFFIX = ".safetensors"
SOURCE_FILE = "source.txt"
STALE_PARTIAL_S = 600  # a partial file untouched this long belongs to no live writer


OFF_VARIABLE = "CAKE_NO_WEIGHT_CACHE"  # set (to anything but 0): off, as --no-weight-cache


def _off_in_environment() -> bool:
    return os.environ.get(OFF_VARIABLE, "0") not in ("", "0")


@dataclass
class Settings:
    enabled: bool = field(default_factory=lambda: not _off_in_environment())
    max_bytes: int | None = None  # --weight-cache-size; None: DEFAULT_SHARE of the disk
    writable: bool = True  # False after a write failed (a full disk): warned once


_settings = Settings()


def configure(enabled: bool | None = None, max_bytes: int | None = None) -> None:
    """--no-weight-cache and --weight-cache-size, for every load in this process (enabled
    None: as CAKE_NO_WEIGHT_CACHE says)."""
    global _settings
    _settings = Settings(not _off_in_environment() if enabled is None else enabled, max_bytes)


def settings() -> Settings:
    return _settings


def weights_folder() -> Path:
    return cache_root() / "weights"


def bound() -> int:
    """The most bytes the cache keeps."""
    if _settings.max_bytes is not None:
        return _settings.max_bytes
    folder = weights_folder()
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    return int(shutil.disk_usage(existing).total * DEFAULT_SHARE)


def stop_writing(reason: str) -> None:
    """A write failed or the bound is too small: warn once, run on without writing."""
    if _settings.writable:
        log.warning(
            "the packed-weight cache stops writing: %s; this start runs without it "
            "(--no-weight-cache turns it off, --weight-cache-size bounds it)",
            reason,
        )
    _settings.writable = False


def entries() -> list[Path]:
    return sorted(weights_folder().glob(f"*/*{ENTRY_SUFFIX}"))


def evict(in_use: set[Path]) -> None:
    """Remove least recently used entries until the cache is within its bound, and partial
    files a process left when it was killed mid-write."""
    now = time.time()
    for partial in weights_folder().glob("*/.*.partial"):
        with contextlib.suppress(OSError):  # being written (recent), or removed meanwhile
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()
    limit = bound()
    sized = []
    for path in entries():
        try:
            stat = path.stat()
        except OSError:
            continue  # removed meanwhile by another process
        sized.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in sized)
    for _, size, path in sorted(sized):
        if total <= limit:
            break
        if path in in_use:
            continue
        path.unlink(missing_ok=True)
        total -= size
        _remove_if_empty(path.parent)
    if total > limit:
        stop_writing(
            f"this model's packed weights ({format_size(total)}) exceed the cache's bound "
            f"({format_size(limit)})"
        )


def _remove_if_empty(folder: Path) -> None:
    if not any(folder.glob(f"*{ENTRY_SUFFIX}")):
        shutil.rmtree(folder, ignore_errors=True)


def folder_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def cache_info() -> list[str]:
    """`--cache-info`: the cache folder, each of its folders' size, and the packed weights per
    source file."""
    root = cache_root()
    lines = [f"cache folder: {root} (CAKE_CACHE_DIR sets it)"]
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        lines.append(f"  {folder.name + '/':16} {format_size(folder_size(folder)):>10}")
    if not folders:
        lines.append("  (empty)")
    used = sum(p.stat().st_size for p in entries())
    state = "on" if _settings.enabled else "off (--no-weight-cache)"
    lines.append(
        f"packed weights: {format_size(used)} of at most {format_size(bound())}, {state}; "
        "--clear-weight-cache empties it"
    )
    for source in sorted(p for p in weights_folder().glob("*") if p.is_dir()):
        named = source / SOURCE_FILE
        name = named.read_text(encoding="utf-8").strip() if named.is_file() else "?"
        parts = list(source.glob(f"*{ENTRY_SUFFIX}"))
        size = sum(p.stat().st_size for p in parts)
        lines.append(f"  {source.name}  {format_size(size):>10}  {len(parts):3} entries  {name}")
    return lines


def clear() -> str:
    """`--clear-weight-cache`: remove every packed entry; what was freed, in words."""
    folder = weights_folder()
    size = folder_size(folder) if folder.is_dir() else 0
    shutil.rmtree(folder, ignore_errors=True)
    return f"removed {folder} ({format_size(size)})"
