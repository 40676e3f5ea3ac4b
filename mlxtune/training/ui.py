"""What a training run reports to, and the do-nothing default.

The loop and the session print nothing themselves: they report to a :class:`TrainUI` they are
given (as mlx-lm's trainer reports to its TrainUI). The command layer draws it with rich
(``mlxtune.cli.ui.RichTrainUI``); tests and library callers get :class:`SilentUI`.
"""

from __future__ import annotations

from typing import Protocol

from mlxtune.evaluation.generation import Progress

__all__ = ["Progress", "SilentUI", "TrainUI"]


class TrainUI(Protocol):
    """Where `run` reports. ``message`` gets the one-line notes the session prints (data, memory
    plan, model); ``start``, ``step`` and ``close`` bracket the training steps (``close`` also
    runs when training fails or is interrupted); ``generation`` is the progress display for the
    eval's generation before training starts (None: none)."""

    def message(self, text: str) -> None: ...

    def start(self, total: int, done: int) -> None:
        """Training of ``total`` optimizer steps starts; ``done`` of them ran before (resume)."""

    def step(self, step: int, loss: float, tokens_per_s: float, eval_loss: float | None) -> None:
        """Optimizer step ``step`` (1-based) finished with this train loss and speed (target
        tokens per second); ``eval_loss`` is the latest eval's response-only loss, if any."""

    def close(self) -> None: ...

    def generation(self) -> Progress | None: ...


class SilentUI:
    """Reports nothing: the default when no UI is given."""

    def message(self, text: str) -> None:
        pass

    def start(self, total: int, done: int) -> None:
        pass

    def step(self, step: int, loss: float, tokens_per_s: float, eval_loss: float | None) -> None:
        pass

    def close(self) -> None:
        pass

    def generation(self) -> Progress | None:
        return None
