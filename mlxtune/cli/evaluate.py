"""`mlxtune eval R`: score the base model, the final adapter, any adapter folder, or every saved
checkpoint of a run on the recipe's eval split (losses + generation metrics), as one table."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from mlxtune.cli.options import backend_option, no_progress_option, recipe_argument, set_option
from mlxtune.errors import MlxtuneError
from mlxtune.recipe.loading import load_recipe
from mlxtune.recipe.schema import Recipe
from mlxtune.runs.rundir import EVALS, RunDir, locked_if_run, read_metrics

if TYPE_CHECKING:
    from mlxtune.evaluation.generation import Progress


def targets(run: Path, adapter: str | None, only_base: bool, checkpoints: str | None, with_base: bool) -> list[tuple[str, int | None, Path | None]]:
    """(label, step, adapter folder or None for the base model) in table order."""
    out: list[tuple[str, int | None, Path | None]] = [("base", 0, None)] if with_base or only_base else []
    if only_base:
        return out
    if adapter:
        return out + [(str(adapter), None, Path(adapter))]
    rd = RunDir(run)
    if not rd.is_run():
        raise MlxtuneError(f"{run} holds no run; train first (mlxtune run), point --run at a run directory, "
                           "give --adapter PATH, or use --base to score the base model")
    end = next((e for e in reversed(read_metrics(run)) if e.get("event") == "end"), None)
    final = rd.final_adapter()
    best_dir = rd.best()
    best: list[tuple[str, int | None, Path | None]] = [("best", best_dir[0], best_dir[1])] if best_dir else []
    if checkpoints == "all":
        out += [(f"step-{step}", step, path / "adapter") for step, path in rd.checkpoints()] + best
    if checkpoints == "best":
        if not best:
            raise MlxtuneError(f"{run}/best is missing (the run has no eval yet)")
        return out + best
    if final is not None:
        out.append(("final", int(end["steps"]) if end else None, final))
    if len(out) == (1 if with_base else 0):
        raise MlxtuneError(f"{run} has no adapter yet (no adapters/ or checkpoints/); let the run finish or --resume it")
    return out


def evaluate_targets(recipe: Recipe, name: str, items: list[tuple[str, int | None, Path | None]],
                     run: Path | None, progress: Progress | None) -> list[dict[str, Any]]:
    """Score each target with backend ``name``; rows (and generations) go to the run directory
    when ``run`` holds a run."""
    from mlxtune.data.batching import eval_batches
    from mlxtune.evaluation.scoring import score
    from mlxtune.training.session import load_backend_with_adapter, pad_id, prepare

    model_dir, tokenizer, data = prepare(recipe)
    backend = load_backend_with_adapter(name, model_dir, recipe)
    eval_set = eval_batches(data.eval, recipe.eval.batch_size, pad_id(tokenizer))
    rd = RunDir(run) if run is not None else None
    rows = []
    for label, step, path in items:
        if path is not None:
            backend.load_adapter(path)
        click.echo(f"scoring {label} ...", err=True)
        metrics, gens = score(backend, tokenizer, eval_set, data.eval_records, recipe, adapter=path is not None, progress=progress)
        row = {"checkpoint": label, "step": step, "adapter": str(path) if path else None, "backend": name,
               "metrics": metrics, "time": time.time()}
        rows.append(row)
        if rd is not None and rd.is_run():
            if gens:
                safe = label if path is None or label in ("final", "best") or label.startswith("step-") else "adapter"
                rd.write_generations(f"eval-{safe}.jsonl", gens)
            rd.append_eval(row)
    return rows


@click.command("eval")
@recipe_argument
@backend_option()
@set_option
@click.option("--run", "run_path", type=click.Path(file_okay=False), default=None,
              help="Run directory (default: the recipe's output.dir / run name).")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None, help="Score this adapter folder (PEFT or mlx-lm format).")
@click.option("--base", "only_base", is_flag=True, help="Score the base model only.")
@click.option("--checkpoints", type=click.Choice(["final", "best", "all"]), default=None,
              help="Which adapters of the run: final (adapters/, the default), best (best/), or all (every checkpoints/step-N, best/ and adapters/).")
@click.option("--no-base", is_flag=True, help="Leave the base model out of the table.")
@no_progress_option("No progress bars.")
def eval_cmd(recipe: str, backend: str | None, overrides: tuple[str, ...], run_path: str | None, adapter: str | None,
             only_base: bool, checkpoints: str | None, no_base: bool, no_progress: bool) -> None:
    """Score the base model and the run's adapters on the eval split: losses (response-only and
    full text), perplexity, and the recipe's eval.metrics (BLEU, chrF, pass@k, CEFR). Rows are
    appended to the run's evals.jsonl and its report.md is rebuilt."""
    from mlxtune.cli.ui import RichProgress, print_backend, print_table
    from mlxtune.runs.report import checkpoint_rows, write_report
    from mlxtune.training.backend_choice import resolve_backend

    if only_base and (adapter or checkpoints or no_base):
        raise MlxtuneError("--base scores only the base model: drop --adapter, --checkpoints and --no-base")
    if adapter and checkpoints:
        raise MlxtuneError("--adapter and --checkpoints exclude each other")
    r = load_recipe(recipe, list(overrides))
    run = Path(run_path) if run_path else Path(r.output.dir) / r.run_name
    with locked_if_run(run):  # it writes evals.jsonl, generations/ and report.md there
        items = targets(run, adapter, only_base, checkpoints, with_base=not no_base)
        name, note = resolve_backend(backend or r.backend)
        print_backend(name, note)
        rows = evaluate_targets(r, name, items, run, progress=None if no_progress else RichProgress())
        header, table, best = checkpoint_rows(rows, r.eval.best_metric)
        print_table(header, table, title=f"{r.run_name}: eval split, {len(rows)} model(s)", left=["checkpoint"])
        if best and len(rows) > 1:
            click.echo(f"best by {r.eval.best_metric}: {best}")
        if RunDir(run).is_run():
            click.echo(f"appended to {run / EVALS}; report: {write_report(run)}")
