"""Which kernel runs a quantized weight on this machine: measured once, then remembered.

For a weight format (int4 in groups, int8) and shape on a device, `choose` times every usable
candidate (cake/model/kernels/candidates.py) on a weight of that shape: the decode shape (one
row) and the prefill shape (PROBE_PREFILL_ROWS rows). A candidate whose output strays from the
f32 product of the same stored weights by more than ACCURACY_BOUND is dropped (on an input with
outlier channels, as LLM activations have). Decode takes the fastest; prefill the fastest among
the kernels that read the decode kernel's layout, so one copy of the weight serves both. The
choice is kept in `<cache>/kernels/choices.json` under a key naming the CPU model, its ISA, the
torch version, the thread count and the native library's source, and read back on the next
start; another machine, torch or thread count measures afresh.

`--kernels NAME` (`use`) skips the measurement and runs NAME wherever it can run (elsewhere the
measured choice stands); `dense` is only ever used when named, since it holds the weight
dequantized (2-4x the bytes).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cake.host.cache import cache_root
from cake.model.kernels import native
from cake.model.kernels.candidates import NAMES, Kernel, Packed, candidates
from cake.model.quant import KERNEL_DTYPE, QuantizedTensor

log = logging.getLogger("cake.kernels")

# Inputs with more rows than this take the prefill kernel. Where cake's avx2 kernel decodes and
# dequant-gemm prefills, they cross near 32 rows on an AVX-512 Xeon (a 14336 x 4096 Q4_0 weight:
# 21 rows 17.8 vs 34.5 ms, 32 rows 23.9 vs 24.2, 48 rows 36.7 vs 29.0); an AVX2-only CPU's GEMM
# is slower, so its crossover is later. Short prefills (a chat turn, a recovered worker's
# replayed prompt) are up to 2x faster than at 16.
DECODE_ROWS = 32
PROBE_PREFILL_ROWS = 128  # a prefill step: engine.scheduler.DEFAULT_STEP_POSITIONS
PROBE_MAX_OUT = 4096  # larger weights are timed on this many of their rows (time is linear)
ACCURACY_BOUND = 0.03  # relative L2 error against the f32 product of the same stored weights
# The LM head's outputs are compared with each other to pick a token: a logit of 20 rounded to
# bf16 moves by up to 0.06, enough to flip a close greedy choice (SmolLM2 Q4_1 answered "L'Étoile,
# la Marseillaise" instead of "Paris" with torch's bf16 int8 kernel on its head, cake's f32
# kernels elsewhere). The head takes a kernel within this bound where one is usable.
LOGITS_BOUND = 0.001
REPEATS = 7
# Part of the cache key: a change to how choices are measured measures them again.
PROBE_VERSION = 2

AUTO = "auto"


@dataclass(frozen=True)
class Choice:
    decode: Kernel
    prefill: Kernel
    how: str  # "measured", "cached", "named", "the only candidate"
    timings_us: dict[str, float] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        if self.decode is self.prefill:
            return self.decode.name
        return f"{self.decode.name} decode, {self.prefill.name} prefill"


_named = AUTO


def use(name: str) -> None:
    """--kernels: AUTO (measure) or a kernel name to run wherever it can."""
    global _named
    if name != AUTO and name not in NAMES:
        raise ValueError(f"--kernels {name!r}: use auto or one of {', '.join(NAMES)}")
    _named = name


def named() -> str:
    return _named


def choose(
    scheme: str,
    shape: tuple[int, int],
    group_size: int,
    device: torch.device,
    serves_rows: bool = False,
    logits: bool = False,
) -> Choice:
    """The kernels for one weight (see the module docstring); `logits`: the LM head, held to
    LOGITS_BOUND where a usable kernel meets it."""
    usable = _usable(scheme, shape, group_size, device.type, serves_rows)
    if _named != AUTO:
        forced = [k for k in usable if k.name == _named]
        if forced:
            return Choice(forced[0], forced[0], "named")
        _warn_not_usable(_named, scheme, device.type)
    usable = [k for k in usable if not k.trades_memory]
    if not usable:
        reasons = [
            f"{k.name}: {k.unusable(shape, group_size) or 'cannot hand out embedding rows'}"
            for k in candidates(scheme, device.type)
            if not k.trades_memory
        ]
        raise ValueError(
            f"no kernel runs {scheme} weights of shape {shape} on {device.type} here "
            f"({'; '.join(reasons)}); --kernels dense runs them dequantized, in more memory"
        )
    if len(usable) == 1:
        return Choice(usable[0], usable[0], "the only candidate")
    kind = f"int4/g{group_size}" if scheme == "int4" else scheme
    key = (
        f"{kind} {shape[0]}x{shape[1]}{' rows' if serves_rows else ''}{' logits' if logits else ''}"
    )
    by_name = {k.name: k for k in usable}
    remembered = _remembered(device).get(key)
    if remembered and {remembered["decode"], remembered["prefill"]} <= by_name.keys():
        return Choice(by_name[remembered["decode"]], by_name[remembered["prefill"]], "cached")
    choice = _measure(usable, scheme, shape, group_size, device, logits)
    _remember(device, key, choice)
    timings = ", ".join(f"{name} {us:.0f} us" for name, us in choice.timings_us.items())
    log.info(
        "kernels for %s on %s: %s (measured: %s)", key, device.type, choice.describe(), timings
    )
    return choice


def can_serve_rows(weight: QuantizedTensor, device: torch.device) -> bool:
    """Whether a kernel that runs `weight` here (without trading memory) keeps a layout that
    hands out its rows as an embedding table."""
    usable = _usable(weight.scheme, weight.shape, weight.group_size, device.type, True)
    return any(not k.trades_memory for k in usable)


def _usable(
    scheme: str, shape: tuple[int, int], group_size: int, device_type: str, serves_rows: bool
) -> list[Kernel]:
    return [
        k
        for k in candidates(scheme, device_type)
        if k.unusable(shape, group_size) is None and (k.serves_rows or not serves_rows)
    ]


@functools.cache
def _warn_not_usable(name: str, scheme: str, device_type: str) -> None:
    log.warning(
        "--kernels %s cannot run %s weights on %s here; those use the measured choice",
        name, scheme, device_type,
    )  # fmt: skip


def activations_dtype(device: torch.device) -> torch.dtype:
    """What a quantized stage computes in by default on `device`: f32 on a CPU where cake's own
    kernels run (they quantize f32 activations themselves; f32 also keeps the norms, rotary
    and attention between them exact and faster there: SmolLM2 Q4_1 decode 34.9 vs 28.8
    tok/s), bf16 where torch's kernels run (they are fast only with bf16 activations: f32
    ones run 10-40x slower on the CPU)."""
    ours = device.type == "cpu" and _named in (AUTO, "avx2", "dequant-gemm")
    return torch.float32 if ours and native.library() is not None else KERNEL_DTYPE


# --- measuring --------------------------------------------------------------------------------


def probe_weight(scheme: str, shape: tuple[int, int], group_size: int) -> QuantizedTensor:
    """A random weight in `scheme` with the statistics of a real one (values spread over the
    whole range, small scales)."""
    generator = torch.Generator().manual_seed(0)
    out, cols = shape
    if scheme == "int8":
        q = torch.randint(-127, 128, (out, cols), dtype=torch.int8, generator=generator)
        scales = (torch.rand(out, generator=generator) * 1e-3 + 1e-4).to(KERNEL_DTYPE)
        return QuantizedTensor("int8", q, scales)
    groups = cols // group_size
    q = torch.randint(0, 256, (out, cols // 2), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(out, groups, generator=generator) * 2e-3 + 1e-4).to(KERNEL_DTYPE)
    zeros = ((torch.rand(out, groups, generator=generator) - 0.5) * 2e-3).to(KERNEL_DTYPE)
    return QuantizedTensor("int4", q, scales, zeros, group_size)


def probe_input(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian activations with a few outlier channels 20x larger, as LLM hidden states have."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator)
    x[:, torch.randperm(cols, generator=generator)[: max(1, cols // 256)]] *= 20
    return x


def relative_error(
    kernel: Kernel, packed: Packed, x: torch.Tensor, reference: torch.Tensor
) -> float:
    y = kernel.run(packed, x).float().cpu()
    return float((y - reference).norm() / reference.norm().clamp_min(1e-30))


def _measure(
    usable: list[Kernel],
    scheme: str,
    shape: tuple[int, int],
    group_size: int,
    device: torch.device,
    logits: bool = False,
) -> Choice:
    probe_shape = (min(shape[0], PROBE_MAX_OUT), shape[1])
    weight = probe_weight(scheme, probe_shape, group_size)
    dense = weight.dequantize(torch.float32)
    x_decode = probe_input(1, shape[1], 1)
    x_prefill = probe_input(PROBE_PREFILL_ROWS, shape[1], 2)
    refs = {1: x_decode @ dense.T, PROBE_PREFILL_ROWS: x_prefill @ dense.T}
    packs: dict[str, Packed] = {}
    errors: dict[Kernel, float] = {}
    for kernel in usable:
        packed = packs.get(kernel.layout) or kernel.pack(weight, device)
        packs[kernel.layout] = packed
        errors[kernel] = max(
            relative_error(kernel, packed, x.to(device), refs[x.shape[0]])
            for x in (x_decode, x_prefill)
        )
    bound = ACCURACY_BOUND
    if logits and any(error <= LOGITS_BOUND for error in errors.values()):
        bound = LOGITS_BOUND
    accurate = []
    for kernel, error in errors.items():
        if error > bound:
            log.info("kernel %s left out for %s: error %.4f", kernel.name, scheme, error)
        else:
            accurate.append(kernel)
    decode_us = _fastest_us(accurate, packs, x_decode.to(device), device)
    prefill_us = _fastest_us(accurate, packs, x_prefill.to(device), device)
    if not decode_us:
        raise ValueError(f"no kernel for {scheme} {shape} stays within its accuracy bound")
    decode = min(decode_us, key=decode_us.__getitem__)
    same_layout = [k for k in prefill_us if k.layout == decode.layout]
    prefill = min(same_layout, key=prefill_us.__getitem__)
    timings = {f"{k.name} decode": us for k, us in decode_us.items()}
    timings.update({f"{k.name} prefill": us for k, us in prefill_us.items()})
    return Choice(decode, prefill, "measured", timings)


def _fastest_us(
    kernels: list[Kernel], packs: dict[str, Packed], x: torch.Tensor, device: torch.device
) -> dict[Kernel, float]:
    """Each kernel's fastest of REPEATS runs on `x`, in microseconds, after a warm-up.

    The kernels take turns, one run each per round, so that a burst of load from elsewhere on
    a shared machine slows every candidate alike instead of one of them: timed one kernel after
    another, a busy moment once made dequant-gemm (a prefill kernel, 100x slower at one row)
    the decode choice here, and the cached choice kept it."""
    for kernel in kernels:
        kernel.run(packs[kernel.layout], x)
    best = dict.fromkeys(kernels, float("inf"))
    for _ in range(REPEATS):
        for kernel in kernels:
            best[kernel] = min(best[kernel], _time_once_us(kernel, packs[kernel.layout], x, device))
    return best


def _time_once_us(kernel: Kernel, packed: Packed, x: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    kernel.run(packed, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e6


# --- remembering ------------------------------------------------------------------------------


def choices_file() -> Path:
    return cache_root() / "kernels" / "choices.json"


def machine_key(device: torch.device) -> str:
    """What a measured choice depends on: the processor, its ISA, torch, the threads, and our
    own kernels' source."""
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)}"
    else:
        where = f"cpu {cpu_model()} {torch.backends.cpu.get_cpu_capability()}"
        where += f" threads {torch.get_num_threads()}"
    source = hashlib.sha256(native.SOURCE.read_bytes()).hexdigest()[:12]
    return f"{where} | torch {torch.__version__} | kernels {source} | probe {PROBE_VERSION}"


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_all() -> dict:
    try:
        return json.loads(choices_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _remembered(device: torch.device) -> dict:
    entries = _read_all().get(machine_key(device), {})
    return entries if isinstance(entries, dict) else {}


def _remember(device: torch.device, key: str, choice: Choice) -> None:
    everything = _read_all()
    entries = everything.setdefault(machine_key(device), {})
    entries[key] = {
        "decode": choice.decode.name,
        "prefill": choice.prefill.name,
        "timings_us": {name: round(us, 1) for name, us in choice.timings_us.items()},
    }
    path = choices_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(everything, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, path)
    except OSError as error:  # a read-only cache: measure again next time
        log.warning("cannot keep the kernel choice in %s: %s", path, error)


def report(device: torch.device) -> list[str]:
    """`--kernels list`: the candidates per format here, and what was chosen before."""
    lines = [f"machine: {machine_key(device)}"]
    for scheme in ("int4", "int8"):
        for kernel in candidates(scheme, device.type):
            why = kernel.unusable((4096, 4096), 32)
            state = "available" if why is None else f"not available: {why}"
            if kernel.trades_memory and why is None:
                state += " (only when named: holds the weight dequantized)"
            lines.append(f"  {scheme:5} {kernel.name:13} {state}")
    remembered = _remembered(device)
    if remembered:
        lines.append(f"measured choices ({choices_file()}):")
        for key, entry in sorted(remembered.items()):
            lines.append(f"  {key}: decode {entry['decode']}, prefill {entry['prefill']}")
    else:
        lines.append("no measured choices yet: the first model load measures them")
    return lines
