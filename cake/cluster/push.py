"""Tensor push: the master sends an empty worker exactly the tensors of its blocks.

Master side: :func:`push` streams a payload (cake/cluster/payload.py says what it holds) over an
authenticated link (see protocol.py for the exchange).

Worker side, :class:`ModelCache`: ``CACHE_DIR/<fingerprint>/`` is an ordinary model folder
(config.json, tokenizer files, ``model.safetensors.index.json`` and one small safetensors file per
tensor), so the worker loads it with the same loader as any folder. Each arriving tensor is
written to ``<file>.part`` (header first, then data as it comes); a new offer for it resumes at
what that file holds; once complete its sha256 is checked and it is renamed into place. No name
from the wire becomes a path: tensor files are named by the sha256 of the tensor name, and pushed
files must be one of protocol.PUSH_FILES.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cake.cluster.payload import PushItem, sha256_range
from cake.errors import CakeError, Code
from cake.wire.protocol import (
    PUSH_FILES,
    ErrorMessage,
    ProtocolError,
    PushChunk,
    PushOffer,
    PushStored,
    PushWant,
)
from cake.wire.transport import Link

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20  # per PushChunk frame: large enough to stream, small enough to resume
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class PushStats:
    """What one push sent: bytes of tensor/file data, and how many items needed any."""

    bytes_sent: int = 0
    items_sent: int = 0
    items_cached: int = 0  # the worker held them whole already
    resumed_from: int = 0  # bytes the worker already held of partly sent items


async def push(
    link: Link,
    model: str,
    items: Sequence[PushItem],
    stats: PushStats,
    timeout: float = 60.0,
    on_sent: Callable[[int], object] = lambda count: None,
    on_held: Callable[[int], object] = lambda count: None,
) -> None:
    """Offer every item, then stream what the worker lacks; return when all are stored.

    All offers go first (the worker answers each with what it holds), then the chunks, then
    the confirmations are read: one round trip for the whole manifest, not one per tensor.
    `on_sent` is called after each chunk with its size (progress, tests); `on_held` with the
    bytes the worker held already (progress).
    """
    for request_id, item in enumerate(items):
        await link.send(item.offer(request_id, model))
    wants: dict[int, int] = {}
    for _ in items:
        reply = await _reply(link, timeout, PushWant)
        if not 0 <= reply.id < len(items) or reply.offset > items[reply.id].nbytes:
            raise ProtocolError(f"worker sent a bad push_want {reply}")
        wants[reply.id] = reply.offset
    pending = []
    for request_id, item in enumerate(items):
        start = wants[request_id]
        on_held(min(start, item.nbytes))
        if start >= item.nbytes:
            stats.items_cached += 1
            continue
        stats.items_sent += 1
        stats.resumed_from += start
        pending.append(request_id)
        for offset in range(start, item.nbytes, CHUNK_BYTES):
            data = await asyncio.to_thread(
                item.read, offset, min(CHUNK_BYTES, item.nbytes - offset)
            )
            await link.send(PushChunk(id=request_id, offset=offset, data=data))
            stats.bytes_sent += len(data)
            on_sent(len(data))
    for _ in pending:
        reply = await _reply(link, timeout, PushStored)
        if reply.id not in pending:
            raise ProtocolError(f"worker confirmed an item it was not sent: {reply}")


async def _reply(link: Link, timeout: float, kind: type) -> PushWant | PushStored:
    reply = await link.recv(timeout=timeout)
    if isinstance(reply, ErrorMessage):
        raise PushRefused(f"{link.peer} refused the push: {reply.message}")
    if not isinstance(reply, kind):
        raise ProtocolError(f"expected {kind.TYPE!r} from {link.peer}, got {type(reply).__name__}")
    return reply


class PushRefused(RuntimeError):
    """The worker refused an item (checksum mismatch, disk full, ...); the message says why."""


# --------------------------------------------------------------------------------------------
# Worker side: the cache the pushes land in


@dataclass
class _Incoming:
    offer: PushOffer
    path: Path  # the final file
    part: Path  # the file being written
    data_start: int  # where the data begins in `part` (after a safetensors header)
    received: int  # data bytes in `part`


@dataclass
class ModelCache:
    """CACHE_DIR/<model>/: model folders filled by pushes, one per content fingerprint."""

    root: Path
    incoming: dict[tuple[int, int], _Incoming] = field(default_factory=dict)  # (conn, id)
    _owners: dict[Path, int] = field(default_factory=dict)  # part file -> connection writing it

    def folder(self, model: str) -> Path:
        return self.root / model  # `model` is hex, checked by the protocol

    def tensor_names(self, model: str) -> dict[str, str]:
        """tensor name -> sha256 of what is complete in the cache for `model`."""
        index = self.folder(model) / INDEX_FILE
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            return dict(data["cake_sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def offer(self, conn: int, offer: PushOffer) -> int:
        """Bytes of this item already here (nbytes when complete); prepare to receive the rest."""
        folder = self.folder(offer.model)
        folder.mkdir(parents=True, exist_ok=True)
        if offer.kind == "file":
            path = folder / PUSH_FILES[PUSH_FILES.index(offer.name)]  # our constant, not theirs
            header = b""
            complete = path.is_file() and _file_sha256(path, 0) == offer.sha256
        else:
            digest = hashlib.sha256(offer.name.encode()).hexdigest()[:32]
            path = folder / f"t-{digest}.safetensors"
            header = _safetensors_header(offer)
            complete = self.tensor_names(offer.model).get(offer.name) == offer.sha256
            complete = complete and path.is_file()
        if complete:
            return offer.nbytes
        part = path.with_name(path.name + ".part")
        owner = self._owners.get(part)
        if owner is not None and owner != conn:
            raise CakeError(Code.BUSY, f"{offer.name} is being pushed by another master right now")
        self._drop_incoming(part)
        self._owners[part] = conn
        received = 0
        if part.is_file():
            with open(part, "rb") as file:
                held_header = file.read(len(header))
            size = part.stat().st_size
            if held_header == header and size <= len(header) + offer.nbytes:
                received = size - len(header)
            else:
                part.unlink()
        if not part.is_file():
            with open(part, "wb") as file:
                file.write(header)
        self.incoming[(conn, offer.id)] = _Incoming(offer, path, part, len(header), received)
        if received == offer.nbytes:  # everything arrived before; only the check was left
            try:
                self._finish(conn, offer.id)
                return offer.nbytes
            except CakeError:  # it did not check out (and is gone): from the start
                with open(part, "wb") as file:
                    file.write(header)
                self._owners[part] = conn
                self.incoming[(conn, offer.id)] = _Incoming(offer, path, part, len(header), 0)
                return 0
        return received

    def _drop_incoming(self, part: Path) -> None:
        for key, incoming in list(self.incoming.items()):
            if incoming.part == part:
                del self.incoming[key]

    def write(self, conn: int, chunk: PushChunk) -> bool:
        """Append a chunk; True when the item is complete, verified and in place."""
        incoming = self.incoming.get((conn, chunk.id))
        if incoming is None:
            raise CakeError(Code.BAD_PUSH, f"push_chunk for id {chunk.id}, which was not offered")
        if chunk.offset != incoming.received:
            raise CakeError(
                Code.BAD_PUSH,
                f"push_chunk for {incoming.offer.name} at byte {chunk.offset}, expected "
                f"{incoming.received}",
            )
        if incoming.received + len(chunk.data) > incoming.offer.nbytes:
            raise CakeError(Code.BAD_PUSH, f"push_chunk runs past the end of {incoming.offer.name}")
        # Unbuffered: what was written is on disk (in the page cache) even if we are killed next.
        with open(incoming.part, "ab", buffering=0) as file:
            file.write(chunk.data)
        incoming.received += len(chunk.data)
        if incoming.received < incoming.offer.nbytes:
            return False
        self._finish(conn, chunk.id)
        return True

    def _finish(self, conn: int, request_id: int) -> None:
        incoming = self.incoming.pop((conn, request_id))
        self._owners.pop(incoming.part, None)
        offer = incoming.offer
        if _file_sha256(incoming.part, incoming.data_start) != offer.sha256:
            incoming.part.unlink(missing_ok=True)
            raise CakeError(
                Code.BAD_CHECKSUM,
                f"{offer.name}: sha256 mismatch after the push; it will be resent",
            )
        with open(incoming.part, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(incoming.part, incoming.path)
        if offer.kind == "tensor":
            self._record(offer, incoming.path.name)

    def _record(self, offer: PushOffer, file_name: str) -> None:
        """Add a completed tensor to the folder's index (written whole, then renamed)."""
        index = self.folder(offer.model) / INDEX_FILE
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {"metadata": {}, "weight_map": {}, "cake_sha256": {}}
        data["weight_map"][offer.name] = file_name
        data["cake_sha256"][offer.name] = offer.sha256
        temporary = index.with_name(index.name + ".tmp")
        temporary.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(temporary, index)

    def forget(self, conn: int) -> None:
        """A connection ended: its partly written items stay on disk for a resumed push."""
        for key in [key for key in self.incoming if key[0] == conn]:
            self._owners.pop(self.incoming.pop(key).part, None)


def _safetensors_header(offer: PushOffer) -> bytes:
    """The header of a one-tensor safetensors file, built from checked fields only."""
    header = {
        "__metadata__": {"format": "pt"},
        offer.name: {
            "dtype": offer.dtype,
            "shape": list(offer.shape),
            "data_offsets": [0, offer.nbytes],
        },
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def _file_sha256(path: Path, start: int) -> str:
    size = path.stat().st_size
    return sha256_range(path, start, size - start) if size >= start else ""


__all__ = ["ModelCache", "PushRefused", "PushStats", "push"]
