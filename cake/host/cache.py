"""The cache folder: `$CAKE_CACHE_DIR`, else `$XDG_CACHE_HOME/cake`, else `~/.cache/cake`.

Everything cake keeps between runs lives under it: GGUF metadata folders, pushed models,
manifests, built kernels and the kernel choices measured on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("CAKE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cake"
    )
    return Path(root)
