"""cake's own CPU kernels (cpu_avx2.cpp): built once per machine with the system C++ compiler,
kept in the cache folder, called through ctypes.

Why a plain shared library and ctypes, not a torch C++ extension or a JIT library: the source
includes no torch header, so it compiles in ~2 s (a `torch.utils.cpp_extension` build of the
same loops, which includes torch's headers, takes ~40 s on 2 cores and needs ninja); ctypes
costs ~2 us a call (a decode step of the 1B shape makes ~70 calls, ~0.2 ms of ~40); it releases
the GIL like a torch op. numba loops stayed under 2 GB/s on this kind of machine (the issue's
measurement); these read 4-bit weights at ~23 GB/s on 2 AVX2 cores. Threads are OpenMP: torch's
wheel has loaded `libgomp.so.1` by then, so the library binds to the same runtime (the soname is
shared) and its loops run on torch's own thread team, not a second one fighting it.

Where it cannot be built (not x86, no AVX2, no compiler, a compiler error) `library()` returns
None after one log line, and the kernels that need it are left out of the choice.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from cake.host.cache import cache_root

log = logging.getLogger("cake.kernels")

SOURCE = Path(__file__).with_name("cpu_avx2.cpp")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
BUILD_TIMEOUT_S = 120

_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "cake_kernels_version": ([], _INT),
    "cake_cpu_has_avx2": ([], _INT),
    # x, M, K, q, scales, zeros, N, G, y, threads
    "cake_int4_linear": ([_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _INT], None),
    # q, scales, zeros, K, G, r0, r1, out, threads
    "cake_int4_dequantize": ([_PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, _INT], None),
    # x, M, K, q, scales, N, y, threads
    "cake_int8_linear": ([_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _INT], None),
    # q, scales, K, r0, r1, out, threads
    "cake_int8_dequantize": ([_PTR, _PTR, _I64, _I64, _I64, _PTR, _INT], None),
    # x, M, K, w (GGUF Q4_0/Q4_1 blocks), block_bytes, N, y, threads
    "cake_gguf_linear": ([_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _INT], None),
    # w, block_bytes, K, rows (int64), n, out, threads
    "cake_gguf_dequantize": ([_PTR, _I64, _I64, _PTR, _I64, _PTR, _INT], None),
    # x, rows, C, w, eps, out
    "cake_rms_norm": ([_PTR, _I64, _I64, _PTR, ctypes.c_float, _PTR], None),
    # x, rows, row_stride, heads, hd, cos, sin, table_rows
    "cake_rope": ([_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64], None),
    # gate|up, rows, inner, out
    "cake_silu_mul": ([_PTR, _I64, _I64, _PTR], None),
}


class NativeUnavailable(Exception):
    """Why the library cannot be used here (the text ends up in the log line)."""


def library() -> ctypes.CDLL | None:
    """The loaded library, built on first use; None where it cannot be (logged once)."""
    return _loaded()[0]


def unavailable_reason() -> str | None:
    """None when the library loads; else why not."""
    return _loaded()[1]


@functools.cache
def _loaded() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        return _load(), None
    except NativeUnavailable as why:
        log.info("cake's own AVX2 kernels are not used: %s; torch's kernels run instead", why)
        return None, str(why)


def _load() -> ctypes.CDLL:
    if os.environ.get("CAKE_NO_NATIVE_KERNELS", "").strip() not in ("", "0"):
        raise NativeUnavailable("CAKE_NO_NATIVE_KERNELS is set")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeUnavailable(f"this CPU is {platform.machine()}, not x86-64")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise NativeUnavailable(f"this CPU has no AVX2 (torch reports {capability})")
    path = _built()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeUnavailable(f"{path} does not load: {error}") from error
    for name, (args, result) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    if not lib.cake_cpu_has_avx2():
        raise NativeUnavailable("this CPU lacks AVX2, FMA or F16C")
    return lib


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _built() -> Path:
    """The shared library for this source and compiler, compiled into the cache if missing."""
    cxx = compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler (install g++, or set CXX)")
    key = hashlib.sha256(SOURCE.read_bytes() + cxx.encode() + " ".join(FLAGS).encode()).hexdigest()[
        :16
    ]
    folder = cache_root() / "kernels"
    target = folder / f"cpu_avx2-{key}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".so")
        os.close(handle)
    except OSError as error:
        raise NativeUnavailable(f"cannot write to {folder}: {error}") from error
    command = [cxx, *FLAGS, "-o", partial, str(SOURCE)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise NativeUnavailable(f"{Path(cxx).name} failed to build {SOURCE.name}: {last}")
        os.replace(partial, target)  # atomic: a concurrent build writes the same bytes
    except subprocess.TimeoutExpired as error:
        raise NativeUnavailable(f"building {SOURCE.name} took over {BUILD_TIMEOUT_S} s") from error
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("built cake's AVX2 kernels into %s", target)
    return target


def threads() -> int:
    """The thread count torch uses here (OpenMP's per-thread setting may differ in a thread
    started by asyncio, so it is passed to every call)."""
    return torch.get_num_threads()
