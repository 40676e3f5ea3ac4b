"""Which backend a run uses: the one place ``"auto"`` is resolved (Apple Silicon -> mlx, else torch).

Used by `run`, `validate`, `plan`, `eval` and `doctor`, and by ``backends.load_backend``. Names
only: nothing here imports a backend or a framework. (It sits in ``training/`` rather than
``system/`` because :mod:`mlxtune.training.session` needs it and may not import ``system/``.)
"""

from __future__ import annotations

import platform
import sys

BACKEND_NAMES = ("torch", "mlx")  # the keys of backends.BACKENDS, in its order
BACKEND_CHOICES = ("auto", "mlx", "torch")  # what --backend and the recipe's `backend` accept


def apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def resolve_backend(name: str) -> tuple[str, str | None]:
    """(backend name, note) for a recipe's or ``--backend``'s name: ``"auto"`` becomes ``"mlx"`` on
    Apple Silicon and ``"torch"`` elsewhere, with a note saying why; any other name comes back as
    given, without a note (``backends.load_backend`` rejects unknown names)."""
    if name != "auto":
        return name, None
    chosen = "mlx" if apple_silicon() else "torch"
    return chosen, f"auto: {'Apple Silicon' if chosen == 'mlx' else 'not Apple Silicon'}; choose with --backend"


def backend_message(name: str, note: str) -> str:
    """The line a command prints when it resolved ``"auto"``."""
    return f"backend: {name} ({note})"
