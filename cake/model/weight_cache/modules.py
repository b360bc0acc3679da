"""A projection module <-> the packed tensors it holds and a record of what they are.

What can be kept: a QuantizedLinear whose packed values are tensors and integers (every kernel's
layout but fbgemm's, whose prepacked handle is an opaque object), and a ConcatProjection of such
modules. Dense projections are not kept: their weights are the checkpoint's own, read as they
are.

A record is JSON: {"kind": "quantized", layout fields, "tensors": {value: tensor name},
"values": {value: int}} or {"kind": "concat", "parts": [records]}.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from cake.model.linear import ConcatProjection, PackedLayout, QuantizedLinear


def record_of(module: nn.Module, prefix: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The module's record and its tensors, named under `prefix`; None when it cannot be kept."""
    if isinstance(module, ConcatProjection):
        records, tensors = [], {}
        for i, part in enumerate(module.parts):
            kept = record_of(part, f"{prefix}.{i}")
            if kept is None:
                return None
            records.append(kept[0])
            tensors.update(kept[1])
        return {"kind": "concat", "parts": records}, tensors
    if not isinstance(module, QuantizedLinear):
        return None
    record: dict = {"kind": "quantized", **dataclasses.asdict(module.layout())}
    record["tensors"], record["values"] = {}, {}
    tensors = {}
    for name, value in module.packed_values().items():
        if isinstance(value, torch.Tensor):
            record["tensors"][name] = f"{prefix}.{name}"
            tensors[f"{prefix}.{name}"] = value
        elif isinstance(value, int):
            record["values"][name] = value
        else:
            return None
    return record, tensors


def module_of(
    record: dict, tensors: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> nn.Module | None:
    """The module a record describes, over `tensors` (mapped, not copied, on the CPU); None
    when the kernels chosen here now read another layout (the caller packs anew)."""
    if record["kind"] == "concat":
        parts = [module_of(part, tensors, device, dtype) for part in record["parts"]]
        if any(part is None for part in parts):
            return None
        return ConcatProjection(parts)  # type: ignore[arg-type]
    fields = {f.name for f in dataclasses.fields(PackedLayout)}
    layout = PackedLayout(**{k: v for k, v in record.items() if k in fields})
    layout = dataclasses.replace(layout, shape=tuple(layout.shape))
    packed: dict = {name: tensors[key] for name, key in record["tensors"].items()}
    packed.update(record["values"])
    return QuantizedLinear.from_packed(layout, packed, device, dtype)
