"""`mlxtune eval R`: score the base model, the final adapter, any adapter folder, or every saved
checkpoint of a run on the recipe's eval split (losses + generation metrics), as one table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from mlxtune.errors import MlxtuneError
from mlxtune.recipe.schema import SET_HELP, Recipe, load_recipe
from mlxtune.runs.rundir import RunDir, read_metrics


def targets(run: Path, adapter: str | None, only_base: bool, checkpoints: str | None, with_base: bool) -> list[tuple[str, int | None, Path | None]]:
    """(label, step, adapter folder or None for the base model) in table order."""
    out: list[tuple[str, int | None, Path | None]] = [("base", 0, None)] if with_base or only_base else []
    if only_base:
        return out
    if adapter:
        return out + [(str(adapter), None, Path(adapter))]
    if not (run / "metrics.jsonl").is_file():
        raise MlxtuneError(f"{run} holds no run; train first (mlxtune run), point --run at a run directory, "
                           "give --adapter PATH, or use --base to score the base model")
    end = next((e for e in reversed(read_metrics(run)) if e.get("event") == "end"), None)
    final = (run / "adapters").is_dir()
    best = []
    if (run / "best" / "adapter").is_dir():
        best = [("best", int(json.loads((run / "best" / "state.json").read_text())["step"]), run / "best" / "adapter")]
    if checkpoints == "all":
        out += [(f"step-{step}", step, path / "adapter") for step, path in RunDir(run).checkpoints()] + best
    if checkpoints == "best":
        if not best:
            raise MlxtuneError(f"{run}/best is missing (the run has no eval yet)")
        return out + best
    if final:
        out.append(("final", int(end["steps"]) if end else None, run / "adapters"))
    if len(out) == (1 if with_base else 0):
        raise MlxtuneError(f"{run} has no adapter yet (no adapters/ or checkpoints/); let the run finish or --resume it")
    return out


def evaluate_targets(recipe: Recipe, backend_name: str | None, items: list[tuple[str, int | None, Path | None]],
                     run: Path | None, progress: bool) -> list[dict[str, Any]]:
    from mlxtune.data.batching import eval_batches
    from mlxtune.evaluation.scoring import score, write_generations
    from mlxtune.training.session import load_backend_with_adapter, pad_id, prepare, resolve_backend_name

    name = resolve_backend_name(recipe, backend_name)
    model_dir, tokenizer, data = prepare(recipe)
    backend = load_backend_with_adapter(name, model_dir, recipe)
    eval_set = eval_batches(data.eval, recipe.eval.batch_size, pad_id(tokenizer))
    rows = []
    for label, step, path in items:
        if path is not None:
            backend.load_adapter(path)
        click.echo(f"scoring {label} ...", err=True)
        metrics, gens = score(backend, tokenizer, eval_set, data.eval_records, recipe, adapter=path is not None, progress=progress)
        row = {"checkpoint": label, "step": step, "adapter": str(path) if path else None, "backend": name,
               "metrics": metrics, "time": time.time()}
        rows.append(row)
        if run is not None and (run / "metrics.jsonl").is_file():
            if gens:
                safe = label if path is None or label in ("final", "best") or label.startswith("step-") else "adapter"
                write_generations(run / "generations" / f"eval-{safe}.jsonl", gens)
            with open(run / "evals.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    return rows


@click.command("eval")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--backend", type=click.Choice(["auto", "mlx", "torch"]), default=None, help="Override the recipe's backend.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--run", "run_path", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: the recipe's output.dir / run name).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None, help="Score this adapter folder (PEFT or mlx-lm format).")
@click.option("--base", "only_base", is_flag=True, help="Score the base model only.")
@click.option("--checkpoints", type=click.Choice(["final", "best", "all"]), default=None,
              help="Which adapters of the run: final (adapters/, the default), best (best/), or all (every checkpoints/step-N, best/ and adapters/).")
@click.option("--no-base", is_flag=True, help="Leave the base model out of the table.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def eval_cmd(recipe: str, backend: str | None, overrides: tuple[str, ...], run_path: str | None, adapter: str | None,
             only_base: bool, checkpoints: str | None, no_base: bool, no_progress: bool) -> None:
    """Score the base model and the run's adapters on the eval split: losses (response-only and
    full text), perplexity, and the recipe's eval.metrics (BLEU, chrF, pass@k, CEFR). Rows are
    appended to the run's evals.jsonl and its report.md is rebuilt."""
    from rich.console import Console
    from rich.table import Table

    from mlxtune.runs.report import checkpoint_rows, write_report

    if only_base and (adapter or checkpoints or no_base):
        raise MlxtuneError("--base scores only the base model: drop --adapter, --checkpoints and --no-base")
    if adapter and checkpoints:
        raise MlxtuneError("--adapter and --checkpoints exclude each other")
    r = load_recipe(recipe, list(overrides))
    run = Path(run_path) if run_path else Path(r.output.dir) / r.run_name
    items = targets(run, adapter, only_base, checkpoints, with_base=not no_base)
    rows = evaluate_targets(r, backend, items, run, progress=not no_progress)
    header, table, best = checkpoint_rows(rows, r.eval.best_metric)
    t = Table(title=f"{r.run_name}: eval split, {len(rows)} model(s)")
    for col in header:
        t.add_column(col, justify="left" if col == "checkpoint" else "right")
    for row in table:
        t.add_row(*row)
    Console().print(t)
    if best and len(rows) > 1:
        click.echo(f"best by {r.eval.best_metric}: {best}")
    if (run / "metrics.jsonl").is_file():
        click.echo(f"appended to {run / 'evals.jsonl'}; report: {write_report(run)}")
