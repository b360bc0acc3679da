"""Error types the CLI reports as one clear line (importable without torch)."""


class ContextError(ValueError):
    """The prompt (or prompt + output) does not fit the context the caches were sized for."""


class WorkerError(RuntimeError):
    """A worker is unreachable, refused us, or failed a request; the message names it."""


class WorkerGone(WorkerError):
    """A worker did not come back within --retry-timeout: lost for good, as far as we wait."""


class StagesReplaced(WorkerError):
    """The stage a request ran on was retired by a re-plan (cake/engine/replan.py); the session
    resumes on the new stages."""


class KVMemoryError(RuntimeError):
    """A session cannot get KV-cache room (budget, context or session count); that session only.

    `code` is the wire error code a worker answers with: kv_memory_full, context_full,
    too_many_sessions or bad_position.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
