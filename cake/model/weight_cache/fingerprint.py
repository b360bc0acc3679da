"""Which bytes a packed entry was made from: a fingerprint of the source file, taken in ms.

The fingerprint hashes the file's size, its mtime (ns), its first MiB (a GGUF's header: the
metadata and the tensor index that says where every tensor lies) and SAMPLES slices of 64 KiB
spread evenly over the rest, the last one included.

Why not a hash of the whole file: that reads all of it on every start (a 4.5 GB file is ~3 s of
SHA-256 here), the very cost the cache removes. Why this is enough: model files are replaced,
not edited in place, and replacing one changes its mtime (a new download, a new conversion);
a copy that keeps the mtime (cp -p, rsync -t) keeps the bytes too, and the samples and the
header catch most files rewritten with a restored mtime. A copy that does not keep the mtime
misses once and writes its own entries.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEAD_BYTES = 1 << 20
SAMPLES = 16
SAMPLE_BYTES = 64 << 10


def source_fingerprint(path: str | os.PathLike) -> str:
    """24 hex digits naming the file's content as it is now (see the module docstring)."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size} {stat.st_mtime_ns}".encode())
    with open(path, "rb") as file:
        digest.update(file.read(HEAD_BYTES))
        rest = stat.st_size - HEAD_BYTES
        if rest > 0:
            for i in range(SAMPLES):
                # Offsets from just past the head to the last SAMPLE_BYTES of the file.
                offset = HEAD_BYTES + max(0, rest - SAMPLE_BYTES) * i // (SAMPLES - 1)
                file.seek(offset)
                digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()[:24]
