"""The empty-worker messages (describe, measure, push, assign): round trip and refusals."""

from __future__ import annotations

import pytest

from cake.wire.protocol import (
    MAX_PUSH_CHUNK_BYTES,
    Assign,
    Assigned,
    Describe,
    Description,
    Measure,
    Measured,
    ProtocolError,
    PushChunk,
    PushOffer,
    PushStored,
    PushWant,
    parse_message,
)

MODEL = "0123456789abcdef" * 2
SHA = "ab" * 32

CLUSTER_MESSAGES = [
    Describe(id=1),
    Description(
        id=1,
        worker="10.0.0.2:10128",
        device="cpu",
        free_memory=8 << 30,
        total_memory=16 << 30,
        matmul_mflops=120_000,
        model="",
        blocks=[],
    ),
    Description(
        id=2,
        worker="w",
        device="cuda:0",
        free_memory=1,
        total_memory=2,
        matmul_mflops=3,
        model=MODEL,
        blocks=[4, 5],
    ),
    Measure(id=3, config='{"hidden_size": 64}', dtype="auto", positions=256),
    Measured(id=3, block_us=1500, dtype="bf16", block_bytes=1 << 20, free_memory=1 << 30),
    PushOffer(
        id=4,
        model=MODEL,
        kind="tensor",
        name="model.layers.3.mlp.up_proj.weight",
        dtype="BF16",
        shape=[128, 64],
        nbytes=128 * 64 * 2,
        sha256=SHA,
    ),
    PushOffer(
        id=5, model=MODEL, kind="file", name="config.json", dtype="", shape=[], nbytes=9, sha256=SHA
    ),
    PushWant(id=4, offset=100),
    PushChunk(id=4, offset=100, data=b"\x00" * 64),
    PushStored(id=4),
    Assign(id=6, model=MODEL, blocks=[2, 3], dtype="f32", max_seq_len=512),
    Assigned(id=6, blocks=[2, 3]),
]


def _offer(**overrides: object) -> dict[str, object]:
    wire = CLUSTER_MESSAGES[5].to_wire()
    wire.update(overrides)
    return wire


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"name": "../../etc/passwd"}, "not a tensor name"),
        ({"name": "/abs"}, "not a tensor name"),
        ({"name": "x" * 201}, "1 to 200"),
        ({"dtype": "F64"}, "dtype"),
        ({"nbytes": 5}, "nbytes"),
        ({"shape": [-1, 64]}, "shape"),
        ({"sha256": "AB" * 32}, "sha256"),
        ({"model": "../x"}, "model"),
        ({"kind": "folder"}, "kind"),
        ({"kind": "file", "name": "evil.sh", "dtype": "", "shape": []}, "pushed file"),
        ({"kind": "file", "name": "config.json"}, "no dtype"),
    ],
)
def test_bad_push_offers_are_refused(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_message(_offer(**overrides))


def test_chunk_limits() -> None:
    with pytest.raises(ProtocolError, match="data"):
        parse_message({"type": "push_chunk", "id": 1, "offset": 0, "data": b""})
    too_big = b"\x00" * (MAX_PUSH_CHUNK_BYTES + 1)
    with pytest.raises(ProtocolError, match="data"):
        parse_message({"type": "push_chunk", "id": 1, "offset": 0, "data": too_big})
    with pytest.raises(ProtocolError, match="offset"):
        parse_message({"type": "push_chunk", "id": 1, "offset": -1, "data": b"x"})


def test_measure_and_assign_limits() -> None:
    with pytest.raises(ProtocolError, match="dtype"):
        parse_message(
            Measure(id=1, config="{}", dtype="f32", positions=1).to_wire() | {"dtype": "f8"}
        )
    with pytest.raises(ProtocolError, match="config"):
        parse_message({"type": "measure", "id": 1, "config": "", "dtype": "f32", "positions": 1})
    with pytest.raises(ProtocolError, match="blocks"):
        parse_message(
            {
                "type": "assign",
                "id": 1,
                "model": MODEL,
                "blocks": [],
                "dtype": "f32",
                "max_seq_len": 8,
            }
        )
