"""Error types the CLI reports as one clear line (importable without torch)."""


class ContextError(ValueError):
    """The prompt (or prompt + output) does not fit the context the caches were sized for."""


class WorkerError(RuntimeError):
    """A worker is unreachable, refused us, or failed a request; the message names it."""
