"""The one exception type that reaches the user as a clean message."""


class MlxtuneError(Exception):
    """A problem with the user's input or environment.

    The CLI prints the message on one line (no traceback) and exits non-zero, so the
    message must say what is wrong, where (file, key, row) and how to fix it.
    """

    exit_code = 2
