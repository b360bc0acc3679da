"""Property-based fuzzing of the worker's message handling: whatever a peer sends, the only
exception that escapes is ProtocolError (RequestError is one), and valid requests compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cake.protocol import Forward, ProtocolError, parse_message, tensor_to_wire
from cake.weights import load_llama
from cake.worker import Worker

CONTEXT = 16


@pytest.fixture(scope="module")
def worker(tiny_llama: Path) -> Worker:
    part = load_llama(tiny_llama, [1, 2], max_seq_len=CONTEXT)
    return Worker("fuzz", part, max_seq_len=CONTEXT, max_sessions=4)


def tensors() -> st.SearchStrategy[dict]:
    """Wire tensors: mostly well-formed, with bad dtypes, shapes and byte counts mixed in."""
    shape = st.lists(st.integers(0, 70), min_size=0, max_size=4)
    dtype = st.sampled_from(["f32", "f16", "bf16", "i64", "", "f32 "])

    def build(dtype: str, shape: list[int], extra: int) -> dict:
        good = dtype if dtype in ("f32", "f16", "bf16") else "f32"
        wire = tensor_to_wire(
            torch.zeros(
                0, dtype={"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[good]
            )
        )
        itemsize = 2 if good != "f32" else 4
        count = 1
        for size in shape:
            count *= size
        wire.update(dtype=dtype, shape=shape, data=b"\0" * max(count * itemsize + extra, 0))
        return wire

    return st.builds(build, dtype, shape, st.sampled_from([0, 0, 0, -1, 3]))


def forwards() -> st.SearchStrategy[dict]:
    scalar = st.one_of(st.integers(-5, 40), st.text(max_size=3), st.none(), st.booleans())
    return st.fixed_dictionaries(
        {
            "type": st.just("forward"),
            "id": st.one_of(st.integers(0, 10), scalar),
            "session": st.one_of(st.sampled_from(["a", "b", "c", "d", "e"]), scalar),
            "start_pos": st.one_of(st.integers(-2, CONTEXT + 2), scalar),
            "blocks": st.one_of(st.lists(st.integers(-1, 5), max_size=3), scalar),
            "hidden": st.one_of(tensors(), scalar),
        },
        optional={"extra": scalar},
    )


def plausible_forwards() -> st.SearchStrategy[dict]:
    """Well-formed forwards, right or wrong in what they ask: blocks, sizes, positions."""

    def build(
        session: str, start_pos: int, blocks: list[int], length: int, width: int, dtype: torch.dtype
    ) -> dict:
        hidden = torch.randn(1, length, width).to(dtype)
        return Forward(
            id=1, session=session, start_pos=start_pos, blocks=blocks, hidden=hidden
        ).to_wire()

    return st.builds(
        build,
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.integers(0, CONTEXT + 1),
        st.sampled_from([[1], [2], [1, 2], [0], [2, 3]]),
        st.integers(0, 6),
        st.sampled_from([64, 64, 64, 32]),
        st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    )


def any_message() -> st.SearchStrategy[dict]:
    leaf = st.one_of(st.integers(), st.text(max_size=5), st.binary(max_size=8), st.none())
    random_map = st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            leaf,
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=3), inner, max_size=3)
            ),
            max_leaves=6,
        ),
        max_size=5,
    )
    typed = st.builds(
        lambda m, t: {**m, "type": t},
        random_map,
        st.sampled_from(["forward", "close_session", "ping", "hello", "x", "error"]),
    )
    return st.one_of(plausible_forwards(), forwards(), typed, random_map)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(any_message(), min_size=1, max_size=6))
def test_only_protocol_errors_escape(worker: Worker, messages: list[dict]) -> None:
    worker.store.close_all()
    for raw in messages:
        try:
            message = parse_message(raw, max_tensor_elements=CONTEXT * 64)
            if isinstance(message, Forward):
                session = worker.check_request(1, message)
                hidden, _ = worker.run_request(session, message)
                assert hidden.shape == message.hidden.shape
                assert torch.isfinite(hidden).all()
                event("computed")
        except ProtocolError as exc:
            event(f"refused: {type(exc).__name__}")
