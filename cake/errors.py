"""One error base for cake: a code machines compare and a message people read.

Every failure cake raises on purpose is a :class:`CakeError`. Its ``code`` says what kind of
failure it is: a worker answers a refused request with ``ErrorMessage(code=exc.code.value)``,
the master compares a reply's code with a :class:`Code` member, the API maps codes to HTTP
statuses. Its message says the cause and the fix: the CLI prints it as one line.

Kinds with one fixed meaning (a worker failed, the prompt does not fit, a bad topology) are
subclasses that carry their code, so ``except WorkerError`` still reads as what it catches.

Importable without torch, and imports nothing from cake: every layer may raise these.
"""

from __future__ import annotations

import enum


class Code(str, enum.Enum):
    """Every error code cake uses. The values of the wire groups travel in ``error`` replies
    (protocol.ErrorMessage, BatchResult.codes): renaming one breaks older peers."""

    # -- Session refusals: the session store has no room for this session. That session fails
    #    alone; the connection and other sessions go on, and a later try may fit.
    KV_MEMORY_FULL = "kv_memory_full"  # the KV budget (--kv-memory) is held by other sessions
    CONTEXT_FULL = "context_full"  # positions past the session's context (--max-seq-len)
    TOO_MANY_SESSIONS = "too_many_sessions"  # --max-sessions sessions are open already
    BAD_POSITION = "bad_position"  # a forward that skips positions the session never held

    # -- Request errors: a forward the worker cannot serve; that request only.
    BAD_SHAPE = "bad_shape"  # hidden states not (1, T, hidden_size), or T = 0
    UNKNOWN_BLOCK = "unknown_block"  # a block this worker does not serve
    UNKNOWN_SESSION = "unknown_session"  # a session closed, evicted, or lost with a restart
    OUT_OF_MEMORY = "out_of_memory"  # the device ran out of memory (a frame, caches, compute)
    INTERNAL = "internal"  # a failure of the worker's own (a bug or a broken device)

    # -- Connection refusals: answered once, then the worker closes the connection.
    HANDSHAKE_BUSY = "handshake_busy"  # too many handshakes at once; retrying may get in
    AUTH_REQUIRED = "auth_required"  # the worker has a cluster key, the master sent none
    AUTH_UNSUPPORTED = "auth_unsupported"  # the master sent a key, the worker has none
    AUTH_FAILED = "auth_failed"  # the cluster keys differ
    VERSION_MISMATCH = "version_mismatch"  # another protocol version: run the same cake
    MODEL_MISMATCH = "model_mismatch"  # another model (config fingerprint)
    LOADING = "loading"  # still loading its blocks (the message says how far); retry shortly
    BAD_MESSAGE = "bad_message"  # the peer broke the protocol (framing, msgpack, fields)

    # -- Empty-worker control (describe, measure, push, assign).
    NOT_ASSIGNED = "not_assigned"  # a hello to an empty worker no master has assigned yet
    DISK = "disk"  # the push cache cannot store what arrives
    BAD_CONFIG = "bad_config"  # a measure request whose config.json is not a model's
    TOO_LARGE = "too_large"  # one block does not fit the memory the worker offers
    BUSY = "busy"  # serving another master's blocks, or a push of the same item under way
    NOT_LOADED = "not_loaded"  # the assigned blocks could not be loaded from the cache
    BAD_PUSH = "bad_push"  # a chunk not offered, out of order, or past the item's end
    BAD_CHECKSUM = "bad_checksum"  # a pushed item's sha256 differs; it is sent again

    # -- This side only (never on the wire): what the master, the CLI and the API raise.
    WORKER_FAILED = "worker_failed"  # a worker refused us or failed a request
    WORKER_LOST = "worker_lost"  # the connection failed; retrying may help
    WORKER_GONE = "worker_gone"  # a lost worker did not come back within --retry-timeout
    STAGES_REPLACED = "stages_replaced"  # a re-plan retired the stage a request ran on
    CONTEXT_EXCEEDED = "context_exceeded"  # the prompt (plus output) does not fit, or is empty
    BAD_MODEL_FOLDER = "bad_model_folder"  # a model folder or file cake cannot use
    BAD_TOPOLOGY = "bad_topology"  # a topology that does not parse or does not fit the model


# The session store's refusals: the API answers them 503 (try again later), not 5xx-as-a-bug.
SESSION_REFUSALS = frozenset(
    {Code.KV_MEMORY_FULL, Code.CONTEXT_FULL, Code.TOO_MANY_SESSIONS, Code.BAD_POSITION}
)


class CakeError(Exception):
    """A failure with a code (what kind, for machines) and a message (cause and fix, for
    people). Raise it as ``CakeError(Code.X, "...")``; the kinds below fix their code."""

    code: Code

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = Code(code)


class FixedCodeError(CakeError):
    """The base of a kind of CakeError with one meaning: a subclass sets the class's `code`,
    and a raise gives only the message (ProtocolError and TopologyError derive from it too)."""

    def __init__(self, message: str) -> None:
        super().__init__(type(self).code, message)


class WorkerError(FixedCodeError, RuntimeError):
    """A worker is unreachable, refused us, or failed a request; the message names it."""

    code = Code.WORKER_FAILED


class WorkerLost(WorkerError):
    """The connection failed (worker down, network); retrying may help, unlike a refusal."""

    code = Code.WORKER_LOST


class WorkerUnreachable(WorkerLost):
    """No connection to the worker could be opened (not listening yet, or down)."""


class WorkerRefused(WorkerUnreachable):
    """The worker's host refused the connection: nothing listens on its port (the process is
    down, or restarting and not listening yet)."""


class WorkerLoading(WorkerLost):
    """The worker answers but is still loading its blocks; the message says how far (the master
    waits while it moves on)."""


class WorkerGone(WorkerError):
    """A worker did not come back within --retry-timeout: lost for good, as far as we wait."""

    code = Code.WORKER_GONE


class StagesReplaced(WorkerError):
    """The stage a request ran on was retired by a re-plan (cake/engine/replan.py); the session
    resumes on the new stages."""

    code = Code.STAGES_REPLACED


class ContextError(FixedCodeError, ValueError):
    """The prompt (or prompt + output) does not fit the context the caches were sized for."""

    code = Code.CONTEXT_EXCEEDED


class ModelFolderError(FixedCodeError, ValueError):
    """A model folder (or file) that cake cannot use; the message says what to fix."""

    code = Code.BAD_MODEL_FOLDER


__all__ = [
    "SESSION_REFUSALS",
    "CakeError",
    "Code",
    "ContextError",
    "FixedCodeError",
    "ModelFolderError",
    "StagesReplaced",
    "WorkerError",
    "WorkerGone",
    "WorkerLost",
]
