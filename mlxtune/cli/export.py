"""`mlxtune export RUN --format merged OUT`: the run's adapter folded into the base weights, as a
Hugging Face folder (the work is in mlxtune/export/merge.py; this parses options and draws)."""

from __future__ import annotations

from pathlib import Path

import click

from mlxtune.cli.options import no_progress_option
from mlxtune.export.merge import DTYPES


@click.command("export")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["merged"]), default="merged", show_default=True,
              help="merged: the adapter folded into the base weights (LoRA, DoRA), a standard Hugging Face folder.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="Weight dtype of the export (default: the base model's).")
@click.option("--adapter", default=None, metavar="best|final|PATH",
              help="Which adapter: best/ (the default when the run has one), final (adapters/) or an adapter folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (it is replaced only once the new folder is complete).")
@no_progress_option("No progress bar.")
def export_cmd(run: Path, out: Path, fmt: str, dtype: str | None, adapter: str | None, overwrite: bool, no_progress: bool) -> None:
    """Export run RUN's adapter to the folder OUT; stock transformers and mlx-lm load the result."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from mlxtune.cli.ui import err_console
    from mlxtune.export.merge import export_merged

    console = err_console()
    bar = Progress(TextColumn("[bold]merge"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=no_progress)
    with bar:
        task = bar.add_task("merge", total=None)
        res = export_merged(run, out, dtype, adapter, overwrite,
                            progress=lambda done, total: bar.update(task, completed=done, total=total))
    for note in res.notes:
        console.print(f"note: {note}")
    click.echo(f"{res.path}: {fmt} {res.method} adapter from {res.adapter} folded into {res.merged_modules} linear layers; "
               f"{res.tensors} tensors, {res.bytes / 1e6:.1f} MB {res.dtype} in {len(res.shards)} shard(s)")
