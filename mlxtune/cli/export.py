"""`mlxtune export RUN OUT --format merged|peft|mlx|gguf`: the run's adapter as other tools load it
(the work is in mlxtune/export/: merge.py, adapter.py, gguf.py; this parses options and draws)."""

from __future__ import annotations

from pathlib import Path

import click

from mlxtune.cli.options import no_progress_option
from mlxtune.errors import MlxtuneError
from mlxtune.export.merge import DTYPES

FORMATS = ("merged", "peft", "mlx", "gguf")
OUTTYPES = ("f16", "q8_0", "f32")  # as mlxtune/export/gguf.py (not imported here: it is only needed for gguf)


@click.command("export")
@click.argument("run", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="merged", show_default=True,
              help="merged: the adapter folded into the base weights (LoRA, DoRA), a Hugging Face folder; "
                   "peft: the adapter folder for stock peft; mlx: OUT/adapter + OUT/base for stock mlx-lm; "
                   "gguf: the merged model as one .gguf file (llama.cpp, Ollama).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help="merged: weight dtype of the export (default: the base model's).")
@click.option("--outtype", type=click.Choice(list(OUTTYPES)), default=None,
              help="gguf: type of the weight matrices (default f16; norms and biases stay f32), as llama.cpp's --outtype.")
@click.option("--adapter", default=None, metavar="best|final|PATH",
              help="Which adapter: best/ (the default when the run has one), final (adapters/) or an adapter folder.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (it is replaced only once the new one is complete).")
@no_progress_option("No progress bar.")
def export_cmd(run: Path, out: Path, fmt: str, dtype: str | None, outtype: str | None, adapter: str | None, overwrite: bool,
               no_progress: bool) -> None:
    """Export run RUN's adapter to OUT: a merged Hugging Face folder (stock transformers and mlx-lm load it), a PEFT
    adapter folder, an mlx-lm adapter with a base folder mlx-lm reads right, or a GGUF file in llama.cpp's layout
    (checked here by reading it back with transformers' GGUF reader)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from mlxtune.cli.ui import err_console

    console = err_console()
    if dtype is not None and fmt != "merged":
        raise MlxtuneError(f"--dtype applies to --format merged only; for --format gguf use --outtype {'|'.join(OUTTYPES)}"
                           if fmt == "gguf" else f"--dtype applies to --format merged only; drop it for --format {fmt}")
    if outtype is not None and fmt != "gguf":
        raise MlxtuneError(f"--outtype applies to --format gguf only; drop it for --format {fmt}"
                           + (" (use --dtype)" if fmt == "merged" else ""))
    if fmt in ("peft", "mlx"):
        from mlxtune.export.adapter import export_adapter

        res = export_adapter(run, out, fmt, adapter, overwrite)
        for note in res.notes:
            console.print(f"note: {note}")
        if fmt == "peft":
            click.echo(f"{res.path}: {res.method} adapter from {res.adapter} in PEFT's format ({res.how}); "
                       f"load it with peft.PeftModel.from_pretrained(base, \"{res.path}\")")
        else:
            click.echo(f"{res.path}: {res.method} adapter from {res.adapter} in mlx-lm's format ({res.how}) in adapter/, "
                       f"base model in base/ (weights {res.base_weights}); commands in {res.path / 'README.txt'}")
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                   console=console, transient=True, disable=no_progress)
    with bar:
        task = bar.add_task("merge", total=None)

        def progress(done: int, total: int) -> None:
            if done < bar.tasks[0].completed:  # the merge is done; the GGUF file is being written
                bar.update(task, description="gguf")
            bar.update(task, completed=done, total=total)
        if fmt == "gguf":
            from mlxtune.export.gguf import export_gguf

            res = export_gguf(run, out, outtype or "f16", adapter, overwrite, progress=progress)
        else:
            from mlxtune.export.merge import export_merged

            res = export_merged(run, out, dtype, adapter, overwrite, progress=progress)
    for note in res.notes:
        console.print(f"note: {note}")
    if fmt == "gguf":
        types = ", ".join(f"{n} {k}" for k, n in sorted(res.types.items()))
        click.echo(f"{res.path}: {res.method} adapter from {res.adapter} merged, GGUF {res.arch} {res.outtype}; "
                   f"{res.tensors} tensors ({types}), {res.bytes / 1e6:.1f} MB")
    else:
        click.echo(f"{res.path}: {fmt} {res.method} adapter from {res.adapter} folded into {res.merged_modules} linear layers; "
                   f"{res.tensors} tensors, {res.bytes / 1e6:.1f} MB {res.dtype} in {len(res.shards)} shard(s)")
