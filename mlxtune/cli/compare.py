"""`mlxtune compare RUN...`: the summary table of N runs, and for two runs the step-by-step tables
and the verdict (what is compared: :mod:`mlxtune.runs.compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlxtune.errors import MlxtuneError

if TYPE_CHECKING:
    from rich.console import Console


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--tol", default=None, type=float, help="Two runs: absolute tolerance on every loss. Default: from the runs' "
              "recipes, 1e-3 when both compute in float32, 5e-2 when either uses bf16/fp16 (model.dtype or "
              "train.autocast), 0.25 when either trains on a quantized base.")
@click.option("--rtol", default=0.0, show_default=True, type=float, help="Two runs: relative tolerance, added as tol + rtol * |b|.")
@click.option("--all", "show_all", is_flag=True, help="Two runs: print every train step (default: the first and last 20 when there are more than 50).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the runs' loss curves overlaid to this PNG.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None, help="Also write the summary table to this file.")
def compare_cmd(runs: tuple[str, ...], tol: float | None, rtol: float, show_all: bool, plot: str | None, markdown_path: str | None) -> None:
    """Compare runs: one summary table (and --plot for overlaid loss curves). With exactly two
    runs, also step by step: what each ran on (backend, machine), train loss, eval losses, max
    deviation and a verdict (exit code 0 when they AGREE within the tolerance, 1 when they DIFFER).
    A run directory copied from another machine compares like a local one."""
    from mlxtune.runs.compare import compare_runs, pair_markdown, pair_names, summary_markdown, summary_rows

    rows = summary_rows([Path(r) for r in runs])
    table = summary_markdown(rows)
    click.echo(table)
    res = None
    if len(runs) == 2:
        if (tol is not None and tol < 0) or rtol < 0:
            raise MlxtuneError("--tol and --rtol must be >= 0")
        res = compare_runs(runs[0], runs[1], tol=tol, rtol=rtol)
    if markdown_path:
        extra = "\n\n" + pair_markdown(res, pair_names(runs[0], runs[1])) if res is not None else ""
        Path(markdown_path).write_text(table + extra + "\n", encoding="utf-8")
    if plot:
        from mlxtune.runs.plots import loss_plot

        if loss_plot({r["run"]: r["events"] for r in rows}, Path(plot)) is None:
            raise MlxtuneError("--plot needs matplotlib: pip install 'mlxtune[eval]'")
        click.echo(f"plot: {plot}")
    if res is not None:
        _compare_two(res, pair_names(runs[0], runs[1]), show_all)


def _compare_two(res: dict[str, Any], names: tuple[str, str], show_all: bool) -> None:
    from rich.console import Console
    from rich.markup import escape

    from mlxtune.runs.compare import verdict_text

    console = Console()
    for side, name in zip("ab", names):  # which hardware and backend each side ran on
        console.print(f"[bold]{side}[/] ({escape(name)}): {escape(res['sides'][side])}")
    _print_tables(console, res, names, show_all)
    for label, items in zip(names, (res["only_a"], res["only_b"])):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            console.print(f"[yellow]only in {label}:[/] " + ", ".join(items[:5]) + more)
    head, _, rest = verdict_text(res).partition(":")
    if res["agree"]:
        console.print(f"[bold green]{head}[/]:{escape(rest)}")
        return
    console.print(f"[bold red]DIFFER[/]{escape(head[len('DIFFER'):])}:{escape(rest)}")
    click.get_current_context().exit(1)


def _print_tables(console: Console, res: dict[str, Any], names: tuple[str, str], show_all: bool) -> None:
    """Recipe differences, train loss per step, eval losses, speed and memory."""
    from mlxtune.cli.ui import new_table
    from mlxtune.runs.compare import fmt_memory, fmt_number

    name_a, name_b = names
    if res["recipe_diff"]:
        t = new_table(("key", name_a, name_b), title="recipe differences (recipe.resolved.toml)", justify="left")
        for k, a, b in res["recipe_diff"]:
            t.add_row(k, repr(a) if a is not None else "-", repr(b) if b is not None else "-")
        console.print(t)
    rows = res["train"]
    if rows:
        t = new_table(("step", name_a, name_b, "|diff|", "rel"), title="train loss per step")
        shown = rows if show_all or len(rows) <= 50 else rows[:20] + [None] + rows[-20:]
        for r in shown:
            if r is None:
                t.add_row("...", f"({len(rows) - 40} more; --all)", "", "", "")
                continue
            t.add_row(str(r["step"]), fmt_number(r["a"]), fmt_number(r["b"]), f"{r['abs']:.2e}", f"{r['rel']:.2e}",
                      style=None if r["ok"] else "bold red")
        console.print(t)
    if res["eval"]:
        t = new_table(("step", "model", "metric", name_a, name_b, "|diff|", "rel"),
                      title="eval loss (loss = response only, loss_full = full text)")
        for r in res["eval"]:
            t.add_row(str(r["step"]), "adapter" if r["adapter"] else "base", r["field"], fmt_number(r["a"]), fmt_number(r["b"]),
                      f"{r['abs']:.2e}", f"{r['rel']:.2e}", style=None if r["ok"] else "bold red")
        console.print(t)
    sa, sb = res["speed"]["a"], res["speed"]["b"]
    if any(v is not None for v in (*sa.values(), *sb.values())):
        t = new_table(("", name_a, name_b), title="speed and memory (as logged by each run)")
        t.add_row("train tokens/s (mean, after step 1)", fmt_number(sa["tokens_per_s"], 1), fmt_number(sb["tokens_per_s"], 1))
        t.add_row("peak memory", fmt_memory(sa["peak_memory"]), fmt_memory(sb["peak_memory"]))
        console.print(t)
