"""Wire-format tests: encode -> decode == identity, and every malformed input is a ProtocolError."""

from __future__ import annotations

import itertools
import random
import struct

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cluster_protocol import CLUSTER_MESSAGES

from cake.wire.protocol import (
    AUTH_NONCE_BYTES,
    DEFAULT_MAX_FRAME_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    AuthChallenge,
    AuthProof,
    AuthResponse,
    BatchResult,
    CloseSession,
    ErrorMessage,
    ForkSession,
    Forward,
    ForwardBatch,
    FrameDecoder,
    Hello,
    Ping,
    Pong,
    ProtocolError,
    Result,
    SessionForked,
    Welcome,
    encode_frame,
    fingerprint_config,
    frame_buffers,
    host_tensor,
    parse_message,
    tensor_from_wire,
    tensor_to_wire,
)


def _hidden(dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = (1, 3, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _raw_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _forward(**overrides: object) -> dict[str, object]:
    wire = Forward(id=7, session="s1", start_pos=0, blocks=[2, 3], hidden=_hidden()).to_wire()
    wire.update(overrides)
    return wire


ALL_MESSAGES = [
    AuthChallenge(nonce=b"\x01" * AUTH_NONCE_BYTES),
    AuthResponse(nonce=b"\x02" * AUTH_NONCE_BYTES, proof=b"\x03" * 32),
    AuthProof(proof=b"\x04" * 32),
    Hello(fingerprint="abc123", master="laptop"),
    Welcome(
        fingerprint="abc123", worker="worker0", blocks=[0, 1, 5], device="cpu", dtype="float32"
    ),
    Forward(id=1, session="sess-1", start_pos=12, blocks=[6, 7, 8], hidden=_hidden()),
    Forward(id=2, session="x" * 128, start_pos=0, blocks=[0], hidden=_hidden(torch.bfloat16)),
    Result(id=1, hidden=_hidden(torch.float16, (2, 1, 4))),
    ForwardBatch(
        id=3,
        sessions=["a", "b"],
        start_positions=[4, 0],
        lengths=[1, 2],
        blocks=[2, 3],
        hidden=_hidden(),
    ),
    BatchResult(id=3, hidden=_hidden(shape=(1, 1, 8)), failed=[0], codes=["x"], errors=["y"]),
    BatchResult(id=4, hidden=_hidden(shape=(1, 0, 8))),
    CloseSession(session="sess-1"),
    CloseSession(session="sess-2", keep=True),
    ForkSession(id=12, session="sess-3", parent="sess-2", length=40),
    SessionForked(id=12, length=40),
    ErrorMessage(message="block 9 is not served here", code="unknown_block", id=3),
    ErrorMessage(message="bad frame", code="bad_frame"),
    Ping(id=5),
    Pong(id=5),
    *CLUSTER_MESSAGES,
]


def test_short_nonce_is_refused() -> None:
    wire = {"type": "auth_challenge", "nonce": b"short"}
    with pytest.raises(ProtocolError, match="nonce"):
        parse_message(wire)


def test_every_message_type_is_covered() -> None:
    assert {type(msg) for msg in ALL_MESSAGES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: object) -> None:
    (wire,) = FrameDecoder().feed(encode_frame(message.to_wire()))
    assert parse_message(wire) == message


def _reference_frame(message: object) -> bytes:
    """The frame as the design defines it, built independently: a big-endian length, then
    one msgpack map of the fields (tuples as lists, tensors as {dtype, shape, data})."""
    names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    wire: dict[str, object] = {"type": message.TYPE}
    for name, value in vars(message).items():
        if isinstance(value, torch.Tensor):
            data = value.contiguous().view(torch.uint8).numpy().tobytes()
            value = {"dtype": names[value.dtype], "shape": list(value.shape), "data": data}
        elif isinstance(value, tuple):
            value = list(value)
        wire[name] = value
    body = msgpack.packb(wire, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("message", ALL_MESSAGES + CLUSTER_MESSAGES, ids=lambda m: type(m).__name__)
def test_the_wire_bytes_are_the_documented_format(message: object) -> None:
    assert encode_frame(message.to_wire()) == _reference_frame(message)


def test_a_large_frame_is_written_as_prefix_and_packed_body() -> None:
    small = Result(id=1, hidden=_hidden(shape=(1, 1, 64)))
    (frame,) = frame_buffers(small.to_wire())  # one buffer: one TCP segment
    assert frame == _reference_frame(small)
    large = Result(id=2, hidden=_hidden(shape=(1, 128, 512)))  # 256 KiB of hidden states
    prefix, body = frame_buffers(large.to_wire())
    assert prefix + bytes(body) == encode_frame(large.to_wire()) == _reference_frame(large)
    (wire,) = FrameDecoder().feed(prefix + bytes(body))
    assert parse_message(wire) == large
    with pytest.raises(ValueError, match="exceeds the frame limit"):
        frame_buffers(large.to_wire(), max_frame_bytes=1 << 16)


def test_handshake_defaults_to_current_version() -> None:
    assert Hello(fingerprint="f", master="m").version == PROTOCOL_VERSION
    assert parse_message(Hello(fingerprint="f", master="m", version=99).to_wire()).version == 99


def test_eq_sees_tensor_differences() -> None:
    a = Result(id=1, hidden=torch.zeros(1, 2, 3))
    assert a != Result(id=1, hidden=torch.ones(1, 2, 3))
    assert a != Result(id=1, hidden=torch.zeros(1, 3, 2))
    assert a != Result(id=1, hidden=torch.zeros(1, 2, 3, dtype=torch.float16))
    assert a == Result(id=1, hidden=torch.zeros(1, 2, 3))


# ---------------------------------------------------------------------------------- framing


def test_bytes_fed_one_at_a_time() -> None:
    stream = b"".join(encode_frame(m.to_wire()) for m in ALL_MESSAGES)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert [parse_message(w) for w in out] == ALL_MESSAGES
    assert decoder.pending_bytes == 0


def test_several_frames_in_one_chunk() -> None:
    stream = b"".join(encode_frame(m.to_wire()) for m in ALL_MESSAGES)
    assert [parse_message(w) for w in FrameDecoder().feed(stream)] == ALL_MESSAGES


@pytest.mark.parametrize("seed", range(5))
def test_any_split_of_the_stream_gives_the_same_frames(seed: int) -> None:
    stream = b"".join(encode_frame(m.to_wire()) for m in ALL_MESSAGES)
    cuts = sorted(random.Random(seed).sample(range(1, len(stream)), 12))
    decoder, out = FrameDecoder(), []
    for start, end in itertools.pairwise([0, *cuts, len(stream)]):
        out += decoder.feed(stream[start:end])
    assert [parse_message(w) for w in out] == ALL_MESSAGES
    assert decoder.pending_bytes == 0


def test_trailing_partial_frame_is_kept() -> None:
    first, second = encode_frame(Ping(id=1).to_wire()), encode_frame(Pong(id=2).to_wire())
    decoder = FrameDecoder()
    assert decoder.feed(first + second[:3]) == [{"type": "ping", "id": 1}]  # partial header
    assert decoder.pending_bytes == 3
    assert decoder.feed(second[3:-1]) == []  # partial body
    assert decoder.feed(second[-1:]) == [{"type": "pong", "id": 2}]
    assert decoder.pending_bytes == 0


def test_oversize_length_rejected_from_header_alone() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError, match=rf"4294967295 .*{DEFAULT_MAX_FRAME_BYTES}"):
        decoder.feed(struct.pack(">I", 0xFFFF_FFFF))  # only the header: nothing to buffer yet


def test_custom_limit() -> None:
    frame = encode_frame(Ping(id=1).to_wire())
    assert FrameDecoder(max_frame_bytes=len(frame) - 4).feed(frame) == [{"type": "ping", "id": 1}]
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        FrameDecoder(max_frame_bytes=len(frame) - 5).feed(frame)


def test_encode_refuses_frame_over_limit() -> None:
    with pytest.raises(ValueError, match="exceeds the frame limit"):
        encode_frame(Ping(id=1).to_wire(), max_frame_bytes=2)


def test_encode_needs_type() -> None:
    with pytest.raises(ValueError, match="type"):
        encode_frame({"id": 1})


def test_zero_length_frame() -> None:
    with pytest.raises(ProtocolError, match="zero-length"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_garbage_msgpack() -> None:
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        FrameDecoder().feed(_raw_frame(b"\xc1\xc1\xc1"))  # 0xc1 is never valid msgpack


def test_trailing_bytes_inside_body() -> None:
    body = msgpack.packb({"type": "ping", "id": 1}) + b"\x00"
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        FrameDecoder().feed(_raw_frame(body))


@pytest.mark.parametrize("body", [[1, 2], "ping", 3, None], ids=repr)
def test_non_map_body(body: object) -> None:
    with pytest.raises(ProtocolError, match="must be a msgpack map"):
        FrameDecoder().feed(_raw_frame(msgpack.packb(body)))


@pytest.mark.parametrize("body", [{"id": 1}, {"type": 3}, {1: "ping"}], ids=repr)
def test_map_without_str_type(body: dict[object, object]) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(_raw_frame(msgpack.packb(body)))


def test_decoder_stays_failed() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="earlier error"):
        decoder.feed(encode_frame(Ping(id=1).to_wire()))


# ---------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    tensor = _hidden(dtype, (2, 5, 16))
    special = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40], dtype=dtype)
    tensor.view(-1)[:4] = special
    (wire,) = FrameDecoder().feed(encode_frame({"type": "t", "t": tensor_to_wire(tensor)}))
    back = tensor_from_wire(wire["t"])
    assert back.dtype == dtype and back.shape == tensor.shape
    int_view = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(back.view(int_view), tensor.view(int_view))
    back += 1  # writable, owns its memory


def test_tensor_non_contiguous_and_scalar_and_empty() -> None:
    tensor = _hidden(torch.float32, (4, 6)).t()
    assert torch.equal(tensor_from_wire(tensor_to_wire(tensor)), tensor)
    assert torch.equal(tensor_from_wire(tensor_to_wire(torch.tensor(2.5))), torch.tensor(2.5))
    empty = tensor_from_wire(tensor_to_wire(torch.empty(1, 0, 8)))
    assert empty.shape == (1, 0, 8)


def test_a_contiguous_cpu_tensor_is_sent_without_a_copy() -> None:
    tensor = _hidden(torch.float32, (1, 2, 4))
    assert host_tensor(tensor) is tensor
    data = tensor_to_wire(tensor)["data"]
    tensor[0, 0, 0] = 42.0  # the bytes are the tensor's own (encode before mutating it)
    assert bytes(data[:4]) == struct.pack("<f", 42.0)
    strided = _hidden(torch.float32, (4, 6)).t()
    copied = host_tensor(strided)
    assert copied.is_contiguous() and torch.equal(copied, strided)
    before = bytes(tensor_to_wire(strided)["data"])
    strided[0, 0] = 7.0  # a strided tensor travels as a copy: mutating it changes nothing sent
    assert before == copied.numpy().tobytes()


def test_tensor_to_wire_refuses_other_dtypes() -> None:
    with pytest.raises(ValueError, match="f32, f16, bf16"):
        tensor_to_wire(torch.zeros(2, dtype=torch.int64))


def _wire(**overrides: object) -> dict[str, object]:
    wire = {"dtype": "f32", "shape": [2, 3], "data": bytes(24)}
    wire.update(overrides)
    return wire


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (_wire(dtype="f64"), "'f64' is not allowed; allowed: f32, f16, bf16"),
        (_wire(dtype="pickle"), "not allowed"),
        (_wire(dtype=3), "not allowed"),
        (_wire(shape=[2, 4]), "24 bytes .* needs 32 bytes"),
        (_wire(data=bytes(23)), "23 bytes .* needs 24 bytes"),
        (_wire(shape=[-2, -3]), "non-negative"),
        (_wire(shape=[2.0, 3]), "non-negative ints"),
        (_wire(shape=[True, 24]), "non-negative ints"),
        (_wire(shape="23"), "list"),
        (_wire(shape=[1] * 9), "at most 8"),
        (_wire(data="x" * 24), "must be bytes"),
        ({"dtype": "f32", "shape": [0], "data": b"", "extra": 1}, "exactly the fields"),
        ({"dtype": "f32", "shape": [0]}, "exactly the fields"),
        ([1, 2, 3], "must be a map"),
    ],
)
def test_bad_tensor(wire: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        tensor_from_wire(wire)


def test_huge_claimed_shape_is_refused_without_allocating() -> None:
    with pytest.raises(ProtocolError, match="needs"):
        tensor_from_wire(_wire(shape=[2**40, 2**40]))
    with pytest.raises(ProtocolError, match="exceeds the limit of 5"):
        tensor_from_wire(_wire(), max_elements=5)


# ---------------------------------------------------------------------------------- messages


def test_unknown_message_type() -> None:
    with pytest.raises(ProtocolError, match="unknown message type 'shutdown'"):
        parse_message({"type": "shutdown"})


@pytest.mark.parametrize("field", ["id", "session", "start_pos", "blocks", "hidden"])
def test_missing_field(field: str) -> None:
    wire = _forward()
    del wire[field]
    with pytest.raises(ProtocolError, match=f"missing field.*'{field}'"):
        parse_message(wire)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"id": "7"}, "'id' .* must be an int"),
        ({"id": True}, "'id' .* must be an int"),
        ({"session": 5}, "'session' .* must be a str"),
        ({"session": ""}, "'session' must be 1 to 128"),
        ({"session": "s" * 129}, "'session' must be 1 to 128"),
        ({"start_pos": -1}, "'start_pos' must be >= 0"),
        ({"start_pos": 1.5}, "'start_pos' .* must be an int"),
        ({"blocks": []}, "'blocks' must name at least one"),
        ({"blocks": [3, 5]}, "'blocks' must be consecutive"),
        ({"blocks": [4, 3]}, "'blocks' must be consecutive"),
        ({"blocks": [-1, 0]}, "'blocks' must hold non-negative"),
        ({"blocks": ["1"]}, "'blocks' .* must be a list of ints"),
        ({"blocks": 3}, "'blocks' .* must be a list of ints"),
        ({"hidden": b"raw"}, "'hidden'.*must be a map"),
        ({"hidden": {"dtype": "f64", "shape": [], "data": b""}}, "'hidden'.*not allowed"),
        ({"extra": 1}, "unexpected field"),
    ],
)
def test_wrong_field(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_message(_forward(**overrides))


def test_error_id_may_be_nil_but_not_str() -> None:
    assert parse_message({"type": "error", "message": "m", "code": "c", "id": None}).id is None
    with pytest.raises(ProtocolError, match=r"'id' .* int or nil"):
        parse_message({"type": "error", "message": "m", "code": "c", "id": "1"})


def test_parse_message_refuses_non_dict() -> None:
    with pytest.raises(ProtocolError, match="must be a map"):
        parse_message(["forward"])


def test_local_construction_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="'start_pos'"):
        Forward(id=1, session="s", start_pos=-1, blocks=[0], hidden=_hidden())


def test_messages_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Ping(id=1).id = 2  # type: ignore[misc]


# ---------------------------------------------------------------------------------- fingerprint

LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "model_type": "llama",
    "torch_dtype": "bfloat16",
}


def test_fingerprint_ignores_non_architecture_fields() -> None:
    reference = fingerprint_config(LLAMA_3_8B)
    assert len(reference) == 16
    assert fingerprint_config({**LLAMA_3_8B, "torch_dtype": "float32", "_name": "x"}) == reference
    assert fingerprint_config({**LLAMA_3_8B, "rope_theta": 500000}) == reference
    assert fingerprint_config({**LLAMA_3_8B, "head_dim": 128}) == reference  # the default
    reordered = dict(reversed(list(LLAMA_3_8B.items())))
    assert fingerprint_config(reordered) == reference


@pytest.mark.parametrize(
    "change",
    [
        {"num_hidden_layers": 16},
        {"num_key_value_heads": 32},
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"tie_word_embeddings": True},
        {"vocab_size": 32000},
    ],
    ids=repr,
)
def test_fingerprint_sees_architecture_changes(change: dict[str, object]) -> None:
    assert fingerprint_config({**LLAMA_3_8B, **change}) != fingerprint_config(LLAMA_3_8B)


# ---------------------------------------------------------------------------------- property


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


_valid_frames = st.sampled_from([encode_frame(m.to_wire()) for m in ALL_MESSAGES])
_stream = st.lists(
    st.one_of(
        st.binary(max_size=64),
        _valid_frames,
        # well-framed msgpack of arbitrary maps, so parse_message sees hostile dicts too
        st.dictionaries(
            st.sampled_from(["type", "id", "session", "start_pos", "blocks", "hidden", "x"]),
            st.one_of(
                st.sampled_from(list(MESSAGE_TYPES)),
                st.integers(-(2**63), 2**64 - 1),
                st.text(max_size=4),
                st.lists(st.integers(-2, 10), max_size=3),
                st.fixed_dictionaries(
                    {
                        "dtype": st.sampled_from(["f32", "bf16", "i8"]),
                        "shape": st.lists(st.integers(-1, 3), max_size=3),
                        "data": st.binary(max_size=40),
                    }
                ),
                st.none(),
            ),
        ).map(lambda d: _raw_frame(msgpack.packb(d))),
    ),
    max_size=6,
).map(b"".join)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_stream, cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame_bytes=1 << 16)
    try:
        for chunk in _chunks(data, cuts):
            for wire in decoder.feed(chunk):
                parse_message(wire)
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"sessions": ["a", "a"], "start_positions": [0, 0], "lengths": [1, 2]}, "twice"),
        ({"lengths": [1]}, "same length"),
        ({"lengths": [2, 2]}, "rows"),
        ({"lengths": [0, 3]}, "lengths"),
        ({"start_positions": [-1, 0]}, "start_positions"),
        ({"sessions": [], "start_positions": [], "lengths": []}, "sessions"),
        ({"sessions": ["a", 3]}, "list of strs"),
        ({"blocks": [3, 2]}, "consecutive"),
    ],
)
def test_bad_forward_batch_is_refused(overrides: dict, match: str) -> None:
    wire = ForwardBatch(
        id=1,
        sessions=["a", "b"],
        start_positions=[0, 5],
        lengths=[2, 1],
        blocks=[0],
        hidden=_hidden(),
    ).to_wire()
    wire.update(overrides)
    with pytest.raises(ProtocolError, match=match):
        parse_message(wire)
