"""The exception type that reaches the user as a clean message, and the out-of-memory signal."""


class MlxtuneError(Exception):
    """A problem with the user's input or environment.

    The CLI prints the message on one line (no traceback) and exits non-zero, so the
    message must say what is wrong, where (file, key, row) and how to fix it.
    """

    exit_code = 2


class OutOfMemory(MlxtuneError):
    """A training step ran out of memory; the backend has discarded the step's gradients."""


_OOM_WORDS = ("out of memory", "can't allocate memory", "not enough memory", "failed to allocate")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether a framework error is an allocation failure (CUDA, MPS or CPU allocator)."""
    if type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error).lower()
    return any(w in text for w in _OOM_WORDS)
