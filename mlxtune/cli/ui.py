"""How the commands draw: rich consoles, tables, the training bar and the generation bar.

:class:`RichTrainUI` is the :class:`~mlxtune.training.ui.TrainUI` of `mlxtune run` and
:class:`RichProgress` the generation :class:`~mlxtune.evaluation.generation.Progress` of `run`
and `eval`. Imported by the commands when they run (rich is not needed for ``--help``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from mlxtune.runs.report import comparison_rows


def err_console() -> Console:
    """Notes and progress go to stderr; tables and results to stdout."""
    return Console(stderr=True)


def new_table(columns: Sequence[str], *, title: str | None = None, left: Iterable[str] = (),
              justify: str = "right", **kwargs: Any) -> Table:
    """A table whose ``left`` columns are left-aligned and the others ``justify``-aligned."""
    left = set(left)
    table = Table(title=title, **kwargs)
    for col in columns:
        table.add_column(col, justify="left" if col in left else justify)  # type: ignore[arg-type]
    return table


def print_table(header: Sequence[str], rows: Iterable[Sequence[str]], *, title: str, left: Iterable[str]) -> None:
    table = new_table(header, title=title, left=left)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


class RichProgress:
    """The generation bar (stderr): prompts done, prompts per second, time."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task: Any = None

    def start(self, total: int) -> None:
        columns = (TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn())
        self._bar = Progress(*columns, console=err_console())
        self._bar.start()
        self._task = self._bar.add_task("generate", total=total, rate="")

    def advance(self, n: int, rate_text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=rate_text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class RichTrainUI:
    """`mlxtune run`'s display: notes on stderr, the training bar on stdout. ``bar=False``
    (``--no-progress``) keeps the notes and draws no bar, for training or generation."""

    def __init__(self, bar: bool = True) -> None:
        self.console = err_console()
        self.show_bar = bar
        self._bar: Progress | None = None
        self._task: Any = None

    def message(self, text: str) -> None:
        self.console.print(escape(text))

    def start(self, total: int, done: int) -> None:
        if not self.show_bar:
            return
        self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                             TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        self._bar.start()
        self._task = self._bar.add_task("train", total=total, completed=done, info="")

    def step(self, step: int, loss: float, tokens_per_s: float, eval_loss: float | None) -> None:
        if self._bar is None:
            return
        info = f"loss {loss:.4f}  {tokens_per_s:,.0f} tok/s"
        if eval_loss is not None:
            info += f"  eval {eval_loss:.4f}"
        self._bar.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def generation(self) -> RichProgress | None:
        return RichProgress() if self.show_bar else None


def print_backend(name: str, note: str | None) -> None:
    """The note of a resolved ``"auto"`` (nothing for a named backend)."""
    if note:
        err_console().print(f"backend: [bold]{escape(name)}[/] ({escape(note)})")


def print_summary(summary: dict[str, Any]) -> None:
    """`mlxtune run`'s closing table: base vs fine-tuned on the eval split, then speed."""
    rows = comparison_rows(summary["base"], summary["final"])
    if not rows:
        return
    print_table(["metric", "base", "fine-tuned", "reduction"], rows, title="base vs fine-tuned on the eval split",
                left=["metric"])
    err_console().print(f"{summary['trained_tokens_per_s']:.1f} trained tokens/s, {summary['train_seconds']:.1f} s, "
                        f"peak memory {summary['peak_memory'] / 2**30:.2f} GiB")
    print_examples(summary.get("examples") or [])


def print_examples(rows: Sequence[dict[str, Any]]) -> None:
    """eval.show_examples: each example's prompt, then the base model's and the fine-tuned model's text side by side."""
    console = Console()
    for row in rows:
        console.print(f"[bold]eval example {row['index'] + 1}[/], prompt:")
        console.print(escape(row["prompt"]), highlight=False)
        table = new_table(["base model", "fine-tuned"], left=["base model", "fine-tuned"])
        table.add_row(escape(row["base"]), escape(row["tuned"]))
        console.print(table)
