"""Sans-IO wire format shared by the master and the workers.

Bytes in, messages out; no sockets and no asyncio here (h11 style), so every rule is tested by
feeding bytes. The layers, bottom up:

* **Frame**: a 4-byte big-endian unsigned length, then exactly one msgpack map with a str
  ``type`` field. :func:`encode_frame` builds one (:func:`frame_buffers`, for the transport,
  without copying a large body twice); :class:`FrameDecoder` turns a byte stream in any chunking
  into wire dicts, checks each length prefix against a limit before it buffers the body, and
  decodes a frame that arrives whole without buffering it.
* **Tensor**: ``{"dtype": "f32" | "f16" | "bf16", "shape": [int, ...], "data": bytes}`` with raw
  little-endian bytes (:func:`tensor_to_wire`, :func:`tensor_from_wire`). Never pickle, never
  ``torch.load``, never ``eval``: the allow-list of dtypes and the size check are all that stand
  between a peer and our memory.
* **Message**: one frozen dataclass per ``type`` (:class:`Hello`, :class:`Forward`, ...). The
  dataclass fields are the single list of what each message carries: ``to_wire()`` writes them,
  :func:`parse_message` checks them.

Anything a misbehaving peer can cause raises :class:`ProtocolError` and nothing else; after one,
the connection's framing is unknown and the transport should close that connection.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
import sys
import threading
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, ClassVar

import msgpack
import torch

from cake.errors import Code, FixedCodeError

if sys.byteorder != "little":  # pragma: no cover - every CPU/CUDA/MPS host we target is
    # The tensor codec hands torch's native bytes to the wire as they are; on a big-endian host
    # they would need a byte swap that nothing here does.
    raise ImportError(
        "cake.wire.protocol needs a little-endian host: the wire format is little-endian"
    )

PROTOCOL_VERSION = 3  # 2: Welcome says which kernels the worker runs; 3: cached prefixes

# Largest frame body a FrameDecoder accepts by default. A prefill of 8k tokens x 8192 hidden in
# float32 is 256 MiB of hidden state, so 512 MiB leaves room for that plus the msgpack envelope.
DEFAULT_MAX_FRAME_BYTES = 512 * 1024 * 1024

# Before a peer has proved the cluster key (or said hello), only handshake frames are legitimate:
# the largest, a Welcome listing a few hundred block indices, is well under this.
HANDSHAKE_MAX_FRAME_BYTES = 8 * 1024
# What a frame holds besides its hidden states (type, ids, session, block list, tensor header).
FRAME_ENVELOPE_BYTES = 64 * 1024
_WIDEST_WIRE_ITEM_BYTES = 4  # f32, the widest dtype the wire allows


def session_frame_limit(hidden_size: int, max_positions: int) -> int:
    """The largest legitimate frame once a link is up: `max_positions` hidden states in f32.

    A forward or result carries (1, T, hidden_size) with T at most the context (a whole prompt,
    a prefill chunk or a replay chunk all fit in it), so nothing larger is ever needed.
    """
    return max_positions * hidden_size * _WIDEST_WIRE_ITEM_BYTES + FRAME_ENVELOPE_BYTES


# The length prefix is a big-endian uint32, so no frame body can be larger than this.
_MAX_ENCODABLE_FRAME_BYTES = 0xFFFF_FFFF
_LENGTH_PREFIX = struct.Struct(">I")

# Tensor dtypes allowed on the wire, by wire name. Anything else is refused on decode.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
}
_WIRE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in WIRE_DTYPES.items()}
# Same-width integer dtypes: a bitwise view for exact comparison (bf16 has no numpy dtype).
_INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
MAX_TENSOR_DIMS = 8
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data"})

MAX_SESSION_ID_CHARS = 128


class ProtocolError(FixedCodeError):
    """The peer broke the protocol: bad framing, bad msgpack, or a malformed message.

    The one error type for anything that arrives over the network; the connection it came from
    should be answered with an ``error`` message of its code (where possible) and closed.
    """

    code = Code.BAD_MESSAGE


# --------------------------------------------------------------------------------------------
# Frames


# A frame whose payload (bytes, text, tensor data) is up to this size is packed in a buffer the
# thread reuses: a decode step's frame is a few KiB, and a new msgpack.Packer mallocs 256 KiB
# for each. A larger one gets a packer of its own, sized to fit at once (no doubling
# reallocations, and its body is written as the packer holds it: no second copy).
_REUSED_PAYLOAD_BYTES = 192 * 1024
_thread_packers = threading.local()
_SIZED_TYPES = frozenset((bytes, bytearray, memoryview, str))


def _reused_packer() -> msgpack.Packer:
    packer = getattr(_thread_packers, "packer", None)
    if packer is None:  # autoreset: pack() returns the frame's bytes and keeps the buffer
        packer = _thread_packers.packer = msgpack.Packer(use_bin_type=True)
    return packer


def _payload_bytes(message: Mapping[str, Any]) -> int:
    """About what a wire dict's bytes and text take, tensor data included (the rest of a
    frame fits in FRAME_ENVELOPE_BYTES). Exact types, not isinstance: this runs per frame."""
    total = 0
    for value in message.values():
        kind = type(value)
        if kind is dict:  # a tensor
            value = value.get("data")
            kind = type(value)
        if kind in _SIZED_TYPES:
            total += len(value)
    return total


def frame_buffers(
    message: Mapping[str, Any], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tuple[bytes] | tuple[bytes, memoryview]:
    """One wire dict as a frame, in the buffers to write one after the other.

    A small frame is one bytes object (so it leaves in one TCP segment); a large one is the
    length prefix and the body as msgpack packed it, so a prefill's hidden states are copied
    once (into the packer) rather than a second time to join them to the prefix. Tensor
    payloads should be bytes or memoryviews (as :func:`tensor_to_wire` gives).

    Raises ``ValueError`` for a frame the receiver would refuse (too big, no ``type``): that is
    a bug or a too-large request on this side, not a misbehaving peer.
    """
    if not isinstance(message.get("type"), str):
        raise ValueError(f"a wire message needs a str 'type' field, got {message.get('type')!r}")
    payload = _payload_bytes(message)
    if payload <= _REUSED_PAYLOAD_BYTES:
        body = _reused_packer().pack(message)
        return (_length_prefix(message, len(body), max_frame_bytes) + body,)
    packer = msgpack.Packer(
        use_bin_type=True, autoreset=False, buf_size=payload + FRAME_ENVELOPE_BYTES
    )
    packer.pack(message)
    body = packer.getbuffer()  # the packer's own buffer, no copy; it lives as long as the view
    try:
        return _length_prefix(message, len(body), max_frame_bytes), body
    except ValueError:
        body.release()
        raise


def _length_prefix(message: Mapping[str, Any], size: int, max_frame_bytes: int) -> bytes:
    limit = min(max_frame_bytes, _MAX_ENCODABLE_FRAME_BYTES)
    if size > limit:
        raise ValueError(
            f"{message['type']!r} frame of {size} bytes exceeds the frame limit of {limit}"
            " bytes; send less per message (e.g. a shorter prefill chunk) or raise"
            " max_frame_bytes on both ends"
        )
    return _LENGTH_PREFIX.pack(size)


def encode_frame(
    message: Mapping[str, Any], *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> bytes:
    """One wire dict (``message["type"]`` a str) as length prefix + msgpack body, in one bytes
    object (see :func:`frame_buffers`, which the transport uses to copy large frames once)."""
    buffers = frame_buffers(message, max_frame_bytes=max_frame_bytes)
    if len(buffers) == 1:
        return buffers[0]
    prefix, body = buffers
    with body:
        return b"".join((prefix, body))


class FrameDecoder:
    """Incremental frame decoder: ``feed`` bytes in any chunking, get complete wire dicts out.

    Each length prefix is checked against ``max_frame_bytes`` as soon as its 4 bytes arrive, so
    a hostile prefix costs nothing. After a :class:`ProtocolError` the decoder refuses further
    input: the stream's framing is lost and the connection must be closed.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be at least 1, got {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        # The start of a frame whose end has not arrived yet (empty between frames).
        self._buffer = bytearray()
        self._failure: ProtocolError | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held for the next feed (non-zero at EOF = truncated)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        """Add ``data`` and return every frame it completes, in order (often an empty list).

        On a ProtocolError, frames completed earlier in the same call are dropped with it: the
        connection is going away anyway.
        """
        if self._failure is not None:
            raise ProtocolError(f"decoder unusable after an earlier error: {self._failure}")
        try:
            return self._feed(data)
        except ProtocolError as error:
            self._failure = error
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        buffer = self._buffer
        if buffer:  # a frame started in an earlier feed: complete it in the buffer
            buffer += data
            frames, used = _split_frames(buffer, self.max_frame_bytes)
            # bytearray drops a prefix in O(1) by moving its start pointer (CPython), so many
            # small frames or byte-at-a-time input stay linear overall.
            del buffer[:used]
            return frames
        # Nothing held back (the usual case: a decode step's frame arrives whole in one read):
        # frames decode straight from `data`, and only a partial frame at its end is copied.
        frames, used = _split_frames(data, self.max_frame_bytes)
        if used < len(data):
            with memoryview(data) as view, view[used:] as rest:
                buffer += rest
        return frames


def _split_frames(
    source: bytes | bytearray | memoryview, max_frame_bytes: int
) -> tuple[list[dict[str, Any]], int]:
    """The complete frames at the start of `source`, and how many of its bytes they take."""
    frames: list[dict[str, Any]] = []
    offset, size = 0, len(source)
    # Bodies are unpacked from memoryview slices (no copy); all views are released before the
    # caller resizes `source`.
    with memoryview(source) as view:
        while size - offset >= _LENGTH_PREFIX.size:
            (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
            if length == 0:
                raise ProtocolError("zero-length frame: a frame must hold one msgpack map")
            if length > max_frame_bytes:
                raise ProtocolError(
                    f"frame length {length} bytes exceeds the limit of {max_frame_bytes} bytes"
                )
            start = offset + _LENGTH_PREFIX.size
            end = start + length
            if size < end:
                break  # body still arriving
            with view[start:end] as body:
                frames.append(_decode_body(body))
            offset = end
    return frames, offset


def _decode_body(body: memoryview) -> dict[str, Any]:
    """Unpack `body` as exactly one msgpack map with a str ``type``."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as error:  # any failure to decode peer bytes is the peer's fault
        detail = f"{type(error).__name__}: {error}".rstrip(": ")
        raise ProtocolError(f"frame body is not valid msgpack ({detail})") from error
    if not isinstance(message, dict):
        raise ProtocolError(f"frame body must be a msgpack map, got {type(message).__name__}")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("frame body has no str 'type' field")
    return message


# --------------------------------------------------------------------------------------------
# Tensors


def host_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the CPU in C order, as :func:`tensor_to_wire` reads it: `tensor` itself when
    it is that already, else one copy. A caller that keeps what it sent (a replay log) calls
    this once and passes the result to the message, so the frame is encoded without a copy."""
    if not tensor.is_cpu:
        # One device-to-host copy, laid out in C order as it lands (not a strided copy first).
        tensor = tensor.detach().to("cpu", memory_format=torch.contiguous_format)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def tensor_to_wire(tensor: torch.Tensor) -> dict[str, Any]:
    """``{"dtype", "shape", "data"}`` for a float32/float16/bfloat16 tensor on any device.

    ``data`` is a memoryview of the tensor's bytes in C order. It shares memory with ``tensor``
    when that is already a contiguous CPU tensor (no copy; see :func:`host_tensor`), so encode
    the frame before mutating it.
    """
    name = _WIRE_NAMES.get(tensor.dtype)
    if name is None:
        raise ValueError(
            f"cannot send a {tensor.dtype} tensor; wire dtypes are {_allowed_dtypes()}"
        )
    host = tensor if tensor.is_cpu and tensor.is_contiguous() else host_tensor(tensor)
    if host.requires_grad:
        host = host.detach()
    if not host.dim():
        host = host.reshape(1)  # a view as uint8 widens the last dimension: a scalar has none
    # Viewing as uint8 gives exact bytes for every dtype, bf16 included (numpy has no bf16).
    data = memoryview(host.view(torch.uint8).numpy().reshape(-1))  # (numel * itemsize,) bytes
    return {"dtype": name, "shape": list(tensor.shape), "data": data}


def tensor_from_wire(obj: object, *, max_elements: int | None = None) -> torch.Tensor:
    """Check a wire tensor dict and build a writable CPU tensor from a copy of its bytes."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"tensor must be a map, got {type(obj).__name__}")
    if obj.keys() != _TENSOR_FIELDS:
        raise ProtocolError(
            f"tensor must have exactly the fields {sorted(_TENSOR_FIELDS)},"
            f" got {sorted(map(str, obj.keys()))}"
        )
    name, shape, data = obj["dtype"], obj["shape"], obj["data"]
    dtype = WIRE_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"tensor dtype {name!r} is not allowed; allowed: {_allowed_dtypes()}")
    if not isinstance(shape, list | tuple) or len(shape) > MAX_TENSOR_DIMS:
        raise ProtocolError(f"tensor shape must be a list of at most {MAX_TENSOR_DIMS} ints")
    if not all(_is_int(size) and size >= 0 for size in shape):
        raise ProtocolError(f"tensor shape must hold non-negative ints, got {shape!r}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"tensor data must be bytes, got {type(data).__name__}")
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise ProtocolError(f"tensor of {numel} elements exceeds the limit of {max_elements}")
    expected = numel * dtype.itemsize
    if len(data) != expected:
        raise ProtocolError(
            f"tensor data is {len(data)} bytes but shape {list(shape)} of {name}"
            f" needs {expected} bytes"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer refuses an empty buffer
    # bytearray: a private, writable copy, so the tensor owns its memory and torch does not warn
    # about a read-only buffer.
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def _allowed_dtypes() -> str:
    return ", ".join(WIRE_DTYPES)


def _tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (so NaNs and -0.0 compare as sent), on dtype, shape and bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    int_view = _INT_VIEW.get(a.dtype)
    if int_view is None:
        return torch.equal(a.cpu(), b.cpu())
    return torch.equal(a.cpu().view(int_view), b.cpu().view(int_view))


# --------------------------------------------------------------------------------------------
# Messages


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass


@dataclass(frozen=True)
class _FieldKind:
    """One kind of message field: its check, its name in errors, how the message stores it."""

    check: Callable[[Any], bool]
    description: str
    as_tuple: bool = False  # a list on the wire, a tuple in the (frozen) message


_TENSOR_FIELD = _FieldKind(lambda value: isinstance(value, torch.Tensor), "a tensor")
# Field annotation -> its kind; a message field of any other type is a bug of ours.
_FIELD_KINDS: dict[Any, _FieldKind] = {
    int: _FieldKind(_is_int, "an int"),
    str: _FieldKind(lambda value: isinstance(value, str), "a str"),
    bytes: _FieldKind(lambda value: isinstance(value, bytes), "bytes"),
    bool: _FieldKind(lambda value: isinstance(value, bool), "a bool"),
    int | None: _FieldKind(lambda value: value is None or _is_int(value), "an int or nil"),
    tuple[int, ...]: _FieldKind(
        lambda value: isinstance(value, list | tuple) and all(_is_int(item) for item in value),
        "a list of ints",
        as_tuple=True,
    ),
    tuple[str, ...]: _FieldKind(
        lambda value: isinstance(value, list | tuple) and all(isinstance(v, str) for v in value),
        "a list of strs",
        as_tuple=True,
    ),
    torch.Tensor: _TENSOR_FIELD,
}


@dataclass(frozen=True)
class _Layout:
    """What checking, writing and parsing a message class needs, worked out once per class
    (not per message: a decode step builds and parses several)."""

    fields: tuple[tuple[str, _FieldKind], ...]  # in declaration order
    names: frozenset[str]
    required: frozenset[str]
    tensors: tuple[str, ...]


@functools.cache
def _layout(cls: type[_Message]) -> _Layout:
    hints = typing.get_type_hints(cls)  # annotations are strings here
    kinds = []
    for field in fields(cls):  # type: ignore[arg-type]
        kind = _FIELD_KINDS.get(hints[field.name])
        if kind is None:  # pragma: no cover - a new field kind needs an entry in _FIELD_KINDS
            raise TypeError(f"unsupported message field type {hints[field.name]!r}")
        kinds.append((field.name, kind))
    return _Layout(
        fields=tuple(kinds),
        names=frozenset(name for name, _ in kinds),
        required=frozenset(f.name for f in fields(cls) if _is_required(f)),  # type: ignore[arg-type]
        tensors=tuple(name for name, kind in kinds if kind is _TENSOR_FIELD),
    )


class _Message:
    """Base of the message dataclasses: field checks, ``to_wire`` and tensor-aware ``==``.

    Field annotations drive both directions; the supported kinds are those of _FIELD_KINDS:
    ``int``, ``str``, ``bytes``, ``bool``, ``int | None``, ``tuple[int, ...]`` and
    ``tuple[str, ...]`` (lists on the wire) and ``torch.Tensor`` (a tensor dict on the wire).
    Constructing a message with bad values raises ``ValueError`` naming the field;
    :func:`parse_message` turns that into :class:`ProtocolError`.
    """

    TYPE: ClassVar[str]

    def __post_init__(self) -> None:
        for name, kind in _layout(type(self)).fields:
            value = getattr(self, name)
            if not kind.check(value):
                raise ValueError(
                    f"field {name!r} of a {self.TYPE!r} message must be {kind.description},"
                    f" got {type(value).__name__}"
                )
            if kind.as_tuple and type(value) is not tuple:
                object.__setattr__(self, name, tuple(value))  # frozen: store a tuple
        self._check()

    def _check(self) -> None:
        """Per-type value rules beyond the field types; raise ValueError naming the field."""

    def to_wire(self) -> dict[str, Any]:
        """The wire dict for :func:`encode_frame`: ``{"type": TYPE, field: value, ...}``.
        Tuples stay tuples: msgpack writes them as arrays, exactly as lists."""
        wire: dict[str, Any] = {"type": self.TYPE}
        for name, kind in _layout(type(self)).fields:
            value = getattr(self, name)
            wire[name] = tensor_to_wire(value) if kind is _TENSOR_FIELD else value
        return wire

    def __eq__(self, other: object) -> bool:
        # The dataclass-generated __eq__ would call bool() on a tensor comparison and fail.
        if type(other) is not type(self):
            return NotImplemented
        for name, kind in _layout(type(self)).fields:
            mine, theirs = getattr(self, name), getattr(other, name)
            if kind is _TENSOR_FIELD:
                if not _tensors_equal(mine, theirs):
                    return False
            elif mine != theirs:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # tensors are not hashable by value


# Every message dataclass: frozen, keyword-only (so defaults like `version` can sit anywhere),
# and with the tensor-aware __eq__ from _Message rather than a generated one.
_message = dataclass(frozen=True, kw_only=True, eq=False)


def _check_blocks(blocks: tuple[int, ...], field: str = "blocks") -> None:
    if any(block < 0 for block in blocks):
        raise ValueError(f"field {field!r} must hold non-negative block indices, got {blocks}")


def _check_consecutive(blocks: tuple[int, ...]) -> None:
    if not blocks:
        raise ValueError("field 'blocks' must name at least one block")
    _check_blocks(blocks)
    first = blocks[0]
    if blocks != tuple(range(first, first + len(blocks))):
        raise ValueError(f"field 'blocks' must be consecutive and ascending, got {blocks}")


# Cluster-key authentication (only when master and worker have a key): before anything else,
#   master -> worker  AuthChallenge(nonce=Nm)
#   worker -> master  AuthResponse(nonce=Nw, proof=HMAC(key, "worker" Nm Nw))
#   master -> worker  AuthProof(proof=HMAC(key, "master" Nm Nw))
# Each side proves it knows the key for nonces it did not choose; see cake/wire/auth.py.
AUTH_NONCE_BYTES = 32


def _check_nonce(value: bytes, field: str) -> None:
    if len(value) != AUTH_NONCE_BYTES:
        raise ValueError(f"field {field!r} must be {AUTH_NONCE_BYTES} bytes, got {len(value)}")


@_message
class AuthChallenge(_Message):
    TYPE: ClassVar[str] = "auth_challenge"
    nonce: bytes

    def _check(self) -> None:
        _check_nonce(self.nonce, "nonce")


@_message
class AuthResponse(_Message):
    TYPE: ClassVar[str] = "auth_response"
    nonce: bytes
    proof: bytes

    def _check(self) -> None:
        _check_nonce(self.nonce, "nonce")


@_message
class AuthProof(_Message):
    TYPE: ClassVar[str] = "auth_proof"
    proof: bytes


@_message
class Hello(_Message):
    """master -> worker, first frame on a connection."""

    TYPE: ClassVar[str] = "hello"
    fingerprint: str  # fingerprint_config() of the master's model config
    master: str  # free-text name of the master, for the worker's logs
    version: int = PROTOCOL_VERSION


@_message
class Welcome(_Message):
    """worker -> master, the handshake reply: what this worker is and serves."""

    TYPE: ClassVar[str] = "welcome"
    fingerprint: str
    worker: str  # the worker's name (its topology node name)
    blocks: tuple[int, ...]  # absolute indices of the blocks it holds
    device: str  # e.g. "cpu", "cuda:0", "mps"
    dtype: str  # compute dtype of its weights, e.g. "float32"
    version: int = PROTOCOL_VERSION
    # Its session store's limits, so a master can refuse a mismatch before generating:
    max_seq_len: int = 0  # positions one session may hold (worker --max-seq-len); 0 = unknown
    kv_memory: int = 0  # bytes all sessions' KV caches may take (worker --kv-memory); 0 = unknown
    kernels: str = ""  # the kernels its quantized weights run, for the master's log; "" = none

    def _check(self) -> None:
        _check_blocks(self.blocks)
        if self.max_seq_len < 0 or self.kv_memory < 0:
            raise ValueError("fields 'max_seq_len' and 'kv_memory' must be >= 0")


@_message
class Forward(_Message):
    """master -> worker: run ``blocks`` on ``hidden`` at positions ``start_pos`` onwards.

    The session keeps positions 0..start_pos-1 and drops any it held beyond them first: a
    forward at an earlier position is how the master rolls a session back (speculative
    decoding's rejected drafts) without a round trip of its own.
    """

    TYPE: ClassVar[str] = "forward"
    id: int  # request id, echoed in the Result or ErrorMessage
    session: str  # session id; each session owns its own KV caches on the worker
    start_pos: int  # position of hidden[:, 0] in the sequence
    blocks: tuple[int, ...]  # consecutive absolute block indices, ascending
    hidden: torch.Tensor  # (batch, seq_len, hidden_size) hidden states entering blocks[0]

    def _check(self) -> None:
        if not 1 <= len(self.session) <= MAX_SESSION_ID_CHARS:
            raise ValueError(
                f"field 'session' must be 1 to {MAX_SESSION_ID_CHARS} characters,"
                f" got {len(self.session)}"
            )
        if self.start_pos < 0:
            raise ValueError(f"field 'start_pos' must be >= 0, got {self.start_pos}")
        _check_consecutive(self.blocks)


@_message
class Result(_Message):
    """worker -> master: the hidden states after the last block of Forward ``id``."""

    TYPE: ClassVar[str] = "result"
    id: int
    hidden: torch.Tensor  # (batch, seq_len, hidden_size)
    compute_us: int = 0  # the worker's time in tensor work, so the master can split wire time
    # Rows each expert took in this forward, summed over the worker's mixture-of-experts
    # blocks (expert i at index i); empty for a dense model. The master's --stats load balance.
    experts: tuple[int, ...] = ()

    def _check(self) -> None:
        _check_expert_rows(self.experts)


# Most sessions one batched forward may carry: a bound on the per-row work a frame can ask for.
MAX_BATCH_ROWS = 256


def _check_session_id(session: str, field: str = "session") -> None:
    if not 1 <= len(session) <= MAX_SESSION_ID_CHARS:
        raise ValueError(
            f"field {field!r} must hold ids of 1 to {MAX_SESSION_ID_CHARS} characters,"
            f" got {len(session)}"
        )


@_message
class ForwardBatch(_Message):
    """master -> worker: one step of several sessions through the same ``blocks``.

    ``hidden`` stacks every session's rows along the sequence axis: session ``sessions[i]``
    owns ``lengths[i]`` consecutive rows, at positions ``start_positions[i]`` onwards of that
    session. The worker checks each session on its own: a refused one is left out of the reply
    and named in ``failed``/``errors``; the others are computed.
    """

    TYPE: ClassVar[str] = "forward_batch"
    id: int
    sessions: tuple[str, ...]
    start_positions: tuple[int, ...]
    lengths: tuple[int, ...]
    blocks: tuple[int, ...]
    hidden: torch.Tensor  # (1, sum(lengths), hidden_size)

    def _check(self) -> None:
        count = len(self.sessions)
        if not 1 <= count <= MAX_BATCH_ROWS:
            raise ValueError(f"field 'sessions' must name 1 to {MAX_BATCH_ROWS}, got {count}")
        if len(self.start_positions) != count or len(self.lengths) != count:
            raise ValueError(
                "fields 'sessions', 'start_positions' and 'lengths' must have the same length"
            )
        if len(set(self.sessions)) != count:
            raise ValueError("field 'sessions' names a session twice")
        for session in self.sessions:
            _check_session_id(session, "sessions")
        if any(p < 0 for p in self.start_positions):
            raise ValueError("field 'start_positions' must hold positions >= 0")
        if any(n < 1 for n in self.lengths):
            raise ValueError("field 'lengths' must hold lengths >= 1")
        if self.hidden.dim() != 3 or self.hidden.shape[0] != 1:
            raise ValueError(f"field 'hidden' must be (1, T, C), got {list(self.hidden.shape)}")
        if self.hidden.shape[1] != sum(self.lengths):
            raise ValueError(
                f"field 'hidden' holds {self.hidden.shape[1]} rows, 'lengths' add up to "
                f"{sum(self.lengths)}"
            )
        _check_consecutive(self.blocks)


@_message
class BatchResult(_Message):
    """worker -> master: the rows of ForwardBatch ``id`` after its last block, for every
    session not in ``failed`` (in request order); ``errors[i]`` says why ``failed[i]`` was
    refused, ``codes[i]`` its machine code."""

    TYPE: ClassVar[str] = "batch_result"
    id: int
    hidden: torch.Tensor  # (1, rows of the computed sessions, hidden_size); may hold 0 rows
    failed: tuple[int, ...] = ()  # indices into the request's sessions
    codes: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    compute_us: int = 0
    experts: tuple[int, ...] = ()  # as Result's

    def _check(self) -> None:
        if not len(self.failed) == len(self.codes) == len(self.errors):
            raise ValueError("fields 'failed', 'codes' and 'errors' must have the same length")
        _check_expert_rows(self.experts)


MAX_EXPERTS = 1024  # more than any released model has (Qwen3-MoE and DeepSeek: 128-256)


def _check_expert_rows(rows: tuple[int, ...]) -> None:
    if len(rows) > MAX_EXPERTS or any(count < 0 for count in rows):
        raise ValueError(f"field 'experts' must hold at most {MAX_EXPERTS} counts >= 0")


@_message
class CloseSession(_Message):
    """master -> worker: the master is done with ``session`` (no reply). Its KV caches are
    freed, or with ``keep`` kept as a cached prefix: never written again, a source for
    ForkSession, and the first to go (least recently used) when the budget is short."""

    TYPE: ClassVar[str] = "close_session"
    session: str
    keep: bool = False


@_message
class ForkSession(_Message):
    """master -> worker: open ``session`` with a copy of positions 0..length-1 of the cached
    ``parent`` (a finished session kept with CloseSession(keep)), so its first forward starts
    at ``length`` instead of recomputing that prefix. Answered with SessionForked, or with an
    error (``unknown_session`` when the worker no longer holds the parent). With ``move`` the
    session takes the parent's caches instead of a copy, and the parent is gone."""

    TYPE: ClassVar[str] = "fork_session"
    id: int
    session: str
    parent: str
    length: int
    move: bool = False

    def _check(self) -> None:
        _check_session_id(self.session)
        _check_session_id(self.parent, "parent")
        if self.session == self.parent:
            raise ValueError("fields 'session' and 'parent' must differ")
        if self.length < 1:
            raise ValueError(f"field 'length' must be >= 1, got {self.length}")


@_message
class SessionForked(_Message):
    """worker -> master: ForkSession ``id`` is done; the session holds ``length`` positions."""

    TYPE: ClassVar[str] = "session_forked"
    id: int
    length: int


@_message
class ErrorMessage(_Message):
    """Either direction: a refusal or failure; ``id`` names the request, if there is one."""

    TYPE: ClassVar[str] = "error"
    message: str  # human-readable cause
    code: str  # short machine code, e.g. "bad_frame", "unknown_block", "version_mismatch"
    id: int | None = None


@_message
class Ping(_Message):
    TYPE: ClassVar[str] = "ping"
    id: int


@_message
class Pong(_Message):
    TYPE: ClassVar[str] = "pong"
    id: int  # the id of the Ping it answers


# --------------------------------------------------------------------------------------------
# Empty workers (cake/cluster/empty_worker.py): after the cluster-key handshake a master may ask
# a worker started without a model what it is (Describe), time one block of its model there
# (Measure), push the tensors of its blocks (PushOffer / PushWant / PushChunk / PushStored,
# resumable) and assign it those blocks (Assign). Then it connects for forwards with Hello, as
# to any worker.
#
# Push of one file or tensor, all on one connection:
#   master -> worker  PushOffer(id, model, kind, name, dtype, shape, nbytes, sha256)
#   worker -> master  PushWant(id, offset)      bytes it already holds (nbytes: nothing to send)
#   master -> worker  PushChunk(id, offset, data) ...   from `offset` on, in order
#   worker -> master  PushStored(id)            sha256 verified, moved into place
# Names from the wire are checked here and never used as paths on the worker (see push.py).

MAX_NAME_CHARS = 200
MAX_CONFIG_CHARS = 256 * 1024  # a config.json is a few KiB
MAX_PUSH_CHUNK_BYTES = 16 * 1024 * 1024
MAX_PUSH_FILE_BYTES = 64 * 1024 * 1024  # tokenizer.json of Llama 3 is 9 MiB
# Files a master may push besides tensors: the model folder's own files, by their fixed names.
PUSH_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
# safetensors dtype spelling -> bytes per element, for the tensors a master may push.
PUSH_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "I64": 8}
COMPUTE_DTYPES = ("auto", "f32", "f16", "bf16")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_MODEL_ID = re.compile(r"[0-9a-f]{16,64}")


def _check_model_id(value: str, field: str = "model") -> None:
    if not _MODEL_ID.fullmatch(value):
        raise ValueError(f"field {field!r} must be 16 to 64 lowercase hex digits, got {value!r}")


def _check_non_negative(value: int, field: str) -> None:
    if value < 0:
        raise ValueError(f"field {field!r} must be >= 0, got {value}")


def _check_text(value: str, field: str, limit: int = MAX_NAME_CHARS) -> None:
    if not 1 <= len(value) <= limit:
        raise ValueError(f"field {field!r} must be 1 to {limit} characters, got {len(value)}")


@_message
class Describe(_Message):
    """master -> worker: what are you (device, memory, speed, what you serve)?"""

    TYPE: ClassVar[str] = "describe"
    id: int


@_message
class Description(_Message):
    """worker -> master: the answer to Describe."""

    TYPE: ClassVar[str] = "description"
    id: int
    worker: str  # its name (the address it listens on, unless --name gave one)
    device: str  # "cpu", "cuda:0", "mps"
    free_memory: int  # bytes it offers for blocks: its --max-memory, or 90% of what is free
    total_memory: int  # bytes of that device's memory
    matmul_mflops: int  # measured at start: a large float32 matmul, in MFLOP/s
    model: str  # content fingerprint of the model it serves, "" while empty
    blocks: tuple[int, ...]  # blocks it serves now (empty while empty)
    version: int = PROTOCOL_VERSION

    def _check(self) -> None:
        _check_text(self.worker, "worker")
        _check_text(self.device, "device", 64)
        _check_non_negative(self.free_memory, "free_memory")
        _check_non_negative(self.total_memory, "total_memory")
        _check_non_negative(self.matmul_mflops, "matmul_mflops")
        if self.model:
            _check_model_id(self.model)
        _check_blocks(self.blocks)


@_message
class Measure(_Message):
    """master -> worker: time one block of this model (random weights) at this dtype."""

    TYPE: ClassVar[str] = "measure"
    id: int
    config: str  # the model's config.json text (the block's shapes)
    dtype: str  # one of COMPUTE_DTYPES; "auto" is resolved by the worker for its device
    positions: int  # KV positions the timed decode steps attend over
    quantize: str = ""  # "int8" / "int4": the block's linear weights as they will be pushed

    def _check(self) -> None:
        _check_text(self.config, "config", MAX_CONFIG_CHARS)
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"field 'dtype' must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.quantize not in ("", "int8", "int4"):
            raise ValueError(f"field 'quantize' must be '', int8 or int4, got {self.quantize!r}")
        if not 1 <= self.positions <= 1 << 20:
            raise ValueError(f"field 'positions' must be 1 to {1 << 20}, got {self.positions}")


@_message
class Measured(_Message):
    """worker -> master: microseconds one block takes per decoded token there."""

    TYPE: ClassVar[str] = "measured"
    id: int
    block_us: int
    dtype: str  # the dtype it resolved and timed ("f32", "f16", "bf16")
    block_bytes: int  # memory one block takes there: weights + one session's KV cache
    free_memory: int  # bytes it offers for blocks, as in Description

    def _check(self) -> None:
        if self.dtype not in COMPUTE_DTYPES[1:]:
            raise ValueError(f"field 'dtype' must be f32, f16 or bf16, got {self.dtype!r}")
        for name in ("block_us", "block_bytes", "free_memory"):
            _check_non_negative(getattr(self, name), name)


@_message
class PushOffer(_Message):
    """master -> worker: a tensor (or model file) of `model` is coming; how much do you hold?"""

    TYPE: ClassVar[str] = "push_offer"
    id: int
    model: str  # content fingerprint of the model (push.content_fingerprint)
    kind: str  # "tensor" or "file"
    name: str  # tensor name, or one of PUSH_FILES
    dtype: str  # safetensors spelling (PUSH_DTYPES) for a tensor, "" for a file
    shape: tuple[int, ...]  # () for a file
    nbytes: int
    sha256: str  # of the bytes that follow, lowercase hex

    def _check(self) -> None:
        _check_model_id(self.model)
        if not _SHA256_HEX.fullmatch(self.sha256):
            raise ValueError("field 'sha256' must be 64 lowercase hex digits")
        _check_non_negative(self.nbytes, "nbytes")
        if self.kind == "file":
            if self.name not in PUSH_FILES:
                raise ValueError(f"field 'name' of a pushed file must be one of {PUSH_FILES}")
            if self.dtype or self.shape or self.nbytes > MAX_PUSH_FILE_BYTES:
                raise ValueError(
                    f"a pushed file has no dtype or shape and at most {MAX_PUSH_FILE_BYTES} bytes"
                )
        elif self.kind == "tensor":
            _check_text(self.name, "name")
            if not _TENSOR_NAME.fullmatch(self.name):
                raise ValueError(f"field 'name' is not a tensor name: {self.name!r}")
            itemsize = PUSH_DTYPES.get(self.dtype)
            if itemsize is None:
                raise ValueError(f"field 'dtype' must be one of {sorted(PUSH_DTYPES)}")
            if len(self.shape) > MAX_TENSOR_DIMS or any(size < 0 for size in self.shape):
                raise ValueError(f"field 'shape' must be at most {MAX_TENSOR_DIMS} sizes >= 0")
            if math.prod(self.shape) * itemsize != self.nbytes:
                raise ValueError(
                    f"field 'nbytes' is {self.nbytes}, but shape {list(self.shape)} of "
                    f"{self.dtype} takes {math.prod(self.shape) * itemsize}"
                )
        else:
            raise ValueError(f"field 'kind' must be 'tensor' or 'file', got {self.kind!r}")


@_message
class PushWant(_Message):
    """worker -> master: send offer `id` from byte `offset` on (offset == nbytes: nothing)."""

    TYPE: ClassVar[str] = "push_want"
    id: int
    offset: int

    def _check(self) -> None:
        _check_non_negative(self.offset, "offset")


@_message
class PushChunk(_Message):
    """master -> worker: bytes offset..offset+len(data)-1 of offer `id`."""

    TYPE: ClassVar[str] = "push_chunk"
    id: int
    offset: int
    data: bytes

    def _check(self) -> None:
        _check_non_negative(self.offset, "offset")
        if not 1 <= len(self.data) <= MAX_PUSH_CHUNK_BYTES:
            raise ValueError(f"field 'data' must be 1 to {MAX_PUSH_CHUNK_BYTES} bytes")


@_message
class PushStored(_Message):
    """worker -> master: offer `id` is complete, verified and in place."""

    TYPE: ClassVar[str] = "push_stored"
    id: int


@_message
class Assign(_Message):
    """master -> worker: load these blocks of `model` (pushed before) and serve them."""

    TYPE: ClassVar[str] = "assign"
    id: int
    model: str
    blocks: tuple[int, ...]
    dtype: str  # one of COMPUTE_DTYPES
    max_seq_len: int

    def _check(self) -> None:
        _check_model_id(self.model)
        if not self.blocks:
            raise ValueError("field 'blocks' must name at least one block")
        _check_blocks(self.blocks)
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"field 'dtype' must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if not 1 <= self.max_seq_len <= 1 << 20:
            raise ValueError(f"field 'max_seq_len' must be 1 to {1 << 20}")


@_message
class Assigned(_Message):
    """worker -> master: the assignment is loaded; Hello now gets these blocks."""

    TYPE: ClassVar[str] = "assigned"
    id: int
    blocks: tuple[int, ...]

    def _check(self) -> None:
        _check_blocks(self.blocks)


Message = (
    AuthChallenge
    | AuthResponse
    | AuthProof
    | Hello
    | Welcome
    | Forward
    | Result
    | ForwardBatch
    | BatchResult
    | CloseSession
    | ForkSession
    | SessionForked
    | ErrorMessage
    | Ping
    | Pong
    | Describe
    | Description
    | Measure
    | Measured
    | PushOffer
    | PushWant
    | PushChunk
    | PushStored
    | Assign
    | Assigned
)
# wire type name -> dataclass, the dispatch table of parse_message
MESSAGE_TYPES: dict[str, type[_Message]] = {cls.TYPE: cls for cls in typing.get_args(Message)}


def parse_message(msg: object, *, max_tensor_elements: int | None = None) -> Message:
    """Check a decoded wire dict and return its typed message; ProtocolError says what is wrong.

    Unknown types, missing or extra fields, wrongly typed fields and bad tensors are refused.
    ``version`` is returned as sent, not compared: the handshake decides what a mismatch means.
    """
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a map, got {type(msg).__name__}")
    kind = msg.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}; known: {', '.join(MESSAGE_TYPES)}")
    layout = _layout(cls)
    values = {key: value for key, value in msg.items() if key != "type"}
    if not values.keys() >= layout.required:
        missing = layout.required - values.keys()
        raise ProtocolError(f"{kind!r} message is missing field(s) {sorted(missing)}")
    if not values.keys() <= layout.names:
        extra = values.keys() - layout.names
        raise ProtocolError(f"{kind!r} message has unexpected field(s) {sorted(map(repr, extra))}")
    for name in layout.tensors:
        if name in values:
            try:
                values[name] = tensor_from_wire(values[name], max_elements=max_tensor_elements)
            except ProtocolError as error:
                raise ProtocolError(f"field {name!r} of a {kind!r} message: {error}") from None
    try:
        return cls(**values)  # type: ignore[return-value]
    except ValueError as error:
        raise ProtocolError(str(error)) from None


def _is_required(field: Field[Any]) -> bool:
    return field.default is MISSING and field.default_factory is MISSING


# --------------------------------------------------------------------------------------------
# Model fingerprint

# config.json fields that change the computation a block performs or the shapes it exchanges.
_ARCHITECTURE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "model_type",
    "cake_family_options",  # what a family changes in the block (config.architecture_of)
)


def fingerprint_config(config: Mapping[str, Any]) -> str:
    """16-hex-digit SHA-256 of the architecture fields of a Hugging Face ``config.json`` dict.

    This is an **architecture** fingerprint, not a weights hash: two checkpoints with the same
    shapes and hyper-parameters (e.g. a base and a fine-tuned model) get the same value. It lets
    master and workers agree that they run the same model layout; it does not prove they loaded
    the same weights.

    Equivalent spellings hash alike: fields that are absent or null are dropped, the Llama
    defaults for ``head_dim``, ``num_key_value_heads`` and ``tie_word_embeddings`` are filled
    in, and every number is hashed as a float (so ``500000`` and ``500000.0`` agree).
    """
    selected = {key: config[key] for key in _ARCHITECTURE_FIELDS if config.get(key) is not None}
    heads = selected.get("num_attention_heads")
    if "head_dim" not in selected and "hidden_size" in selected and heads:
        selected["head_dim"] = selected["hidden_size"] // heads
    if "num_key_value_heads" not in selected and heads:
        selected["num_key_value_heads"] = heads
    selected.setdefault("tie_word_embeddings", False)
    canonical = json.dumps(
        _numbers_as_floats(selected), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]


def _numbers_as_floats(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(key): _numbers_as_floats(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_numbers_as_floats(item) for item in value]
    return value
