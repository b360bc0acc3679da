"""The packed-weight cache: a GGUF's weights in the layout this machine's kernels read, kept on
disk after the first start and mapped (not read, not converted) on the next ones.

Converting a Q4_0 GGUF into the kernels' layout took most of a start (a Llama-3.2-1B shape:
2.3 of ~3 s of loading); a cached entry is mapped in milliseconds and checked at ~2 GB/s. By
concept:
- fingerprint.py: which source file an entry was made from (size, mtime, sampled bytes);
- entry.py: one entry, a safetensors file written atomically with a checksum, mapped back or
  refused as corrupt;
- modules.py: a projection module <-> its packed tensors and a record of their layout;
- store.py: the folder (`<cache>/weights`), its size bound, least-recently-used eviction,
  `--cache-info` and `--clear-weight-cache`, and the process's settings (`--no-weight-cache`);
- parts.py: a load's view of the cache: one entry per block (and one for the head), hits
  mapped, misses packed as before and written by a writer thread while the process goes on.
"""

from cake.model.weight_cache.parts import CachedPart, WeightCache, flush, open_cache
from cake.model.weight_cache.store import cache_info, clear, configure

__all__ = ["CachedPart", "WeightCache", "cache_info", "clear", "configure", "flush", "open_cache"]
