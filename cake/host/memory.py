"""This machine's memory: how much a device has free, and giving freed heap back to the system.

torch is imported only where a GPU is asked about, so that the CLI can call `one_malloc_arena`
before torch (and its threads) exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

M_ARENA_MAX = -8  # glibc's mallopt parameter


@dataclass(frozen=True)
class DeviceMemory:
    free: int  # bytes that can still be allocated now
    total: int  # bytes the device has in all


_mapped_weights = 0  # bytes of weights this process runs from mapped files


def note_mapped_weights(n_bytes: int) -> None:
    """Weights this process runs from a file's mapped pages (the packed-weight cache). Those
    pages are page cache, which the system counts as available; the CPU's free memory leaves
    them out, or a budget taken from it (--kv-memory's default) would grow into the weights and
    push their pages out to be read again from disk."""
    global _mapped_weights
    _mapped_weights += n_bytes


def device_memory(device: torch.device) -> DeviceMemory:
    """Free and total memory of the memory tensors on `device` live in.

    CUDA asks the driver. MPS shares the system's memory, but Metal lets a process use only its
    recommended working set: free is what of that this process has not allocated. The CPU is the
    system's available RAM (/proc/meminfo, else psutil, else sysconf), less the weights this
    process runs from mapped files (note_mapped_weights).
    """
    if device.type == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(int(free), int(total))
    if device.type == "mps":
        import torch

        total = int(torch.mps.recommended_max_memory())
        return DeviceMemory(max(total - int(torch.mps.driver_allocated_memory()), 0), total)
    system = _system_memory()
    return DeviceMemory(max(system.free - _mapped_weights, 0), system.total)


def _system_memory() -> DeviceMemory:
    with contextlib.suppress(OSError, KeyError, ValueError, IndexError):
        fields = {}
        with open("/proc/meminfo", encoding="ascii") as file:
            for line in file:
                key, _, value = line.partition(":")
                fields[key] = int(value.split()[0]) * 1024
        return DeviceMemory(fields.get("MemAvailable", fields["MemFree"]), fields["MemTotal"])
    with contextlib.suppress(ImportError):
        import psutil

        memory = psutil.virtual_memory()
        return DeviceMemory(int(memory.available), int(memory.total))
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return DeviceMemory(
            page * os.sysconf("SC_AVPHYS_PAGES"), page * os.sysconf("SC_PHYS_PAGES")
        )
    except (ValueError, OSError, AttributeError):
        raise ValueError(
            "cannot tell how much memory this machine has free: give sizes explicitly "
            "(--kv-memory, --max-memory)"
        ) from None


def one_malloc_arena() -> None:
    """Every thread allocates from glibc's main heap (glibc only; call before threads start).

    A worker loads its blocks on a helper thread and computes on another; glibc gives each
    thread a heap of its own, where freed temporaries leave holes that malloc_trim returns less
    of: an 8B-shaped worker loading 16 int4 blocks on a thread peaked at 2.67 GiB against 2.48
    on the main thread, and 2.49 with one heap. Decode speed through two workers did not move
    (SmolLM2, 3 rounds each: 33.3 vs 31.1 tok/s median). Workers only: the master loads on its
    main thread, and its HTTP API's many threads showed no gain worth the risk (8 batched
    requests 53.2/57.9 vs 60.7/58.0 tok/s, within noise). MALLOC_ARENA_MAX in the environment
    is left to glibc.
    """
    if os.environ.get("MALLOC_ARENA_MAX"):  # the user's own choice (glibc read it at start)
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Give memory that freed tensors left in the C heap back to the system (glibc only).

    Loading frees each block's checkpoint tensors once they are packed, and a prefill frees
    large activations; glibc keeps such holes in its heap, so a worker would hold ~30% more
    than its blocks need. malloc_trim returns them. (A fixed low mmap threshold would too, but
    then every large temporary costs fresh page faults: prefill ran 25% slower.)
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
