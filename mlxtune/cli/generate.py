"""`mlxtune generate TARGET "prompt" ...` / `--file prompts.jsonl`: a run's model (or any model
folder) on prompts, in the run's own template. The work is in mlxtune/evaluation/chat.py; this
module parses options, opens the target (shared with `mlxtune chat`) and prints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mlxtune.cli.options import backend_option, no_progress_option
from mlxtune.errors import MlxtuneError
from mlxtune.recipe.schema import Recipe

@dataclass
class Target:
    """What to load: the recipe (a run's own, or a default one for a model folder) and the
    adapter folder (None: the base model alone)."""

    recipe: Recipe
    adapter: Path | None
    is_run: bool
    label: str


def resolve_target(target: str, adapter: str | None, base: bool) -> Target:
    from mlxtune.export.merge import adapter_folder, run_recipe
    from mlxtune.recipe.loading import recipe_from_dict
    from mlxtune.runs.rundir import RunDir

    path = Path(target)
    if RunDir(path).is_run():
        if base and adapter:
            raise MlxtuneError("--base generates without an adapter: drop --adapter")
        recipe = run_recipe(path)
        folder = None if base else adapter_folder(path, adapter)
        return Target(recipe, folder, True, f"{path} ({'base model' if folder is None else f'adapter {folder}'})")
    if adapter:
        raise MlxtuneError(f"--adapter {adapter}: {target} is a model folder, not a run directory; --adapter picks "
                           "an adapter of a run (best, final or PATH)")
    if not target.startswith("embedded:") and not (path / "config.json").is_file():
        raise MlxtuneError(f"{target}: neither a run directory (no metrics.jsonl) nor a model folder (no config.json); "
                           "give runs/<name>, an exported folder or embedded:smollm2-135m-instruct")
    # a default recipe: what a backend needs to load the model (its LoRA adapter stays unused)
    recipe = recipe_from_dict({"model": {"path": target}, "data": {"train": "-", "format": "chat"}},
                              where=target, planning=True)
    return Target(recipe, None, False, f"{target} (model folder, no adapter)")


def load_target(target: Target, backend: str | None) -> tuple[Any, Any, dict[str, Any], Target]:
    """(backend, tokenizer, config.json, target); a model folder whose tokenizer has no chat
    template gets the plain template."""
    from mlxtune.cli.ui import print_backend
    from mlxtune.training.backend_choice import resolve_backend
    from mlxtune.training.session import load_for_use

    name, note = resolve_backend(backend or target.recipe.backend)
    print_backend(name, note)
    click.echo(f"loading {target.label} on {name} ...", err=True)
    model, tokenizer, config = load_for_use(target.recipe, name, target.adapter)
    if not target.is_run and not getattr(tokenizer, "chat_template", None):
        data = dataclasses.replace(target.recipe.data, template="plain")
        target = dataclasses.replace(target, recipe=dataclasses.replace(target.recipe, data=data))
    return model, tokenizer, config, target


def target_options(f):
    """TARGET with --adapter / --base and --backend, shared by generate and chat."""
    f = backend_option("Backend (default: the run's, or auto for a model folder).")(f)
    f = click.option("--base", is_flag=True, help="The base model without the run's adapter.")(f)
    f = click.option("--adapter", default=None, metavar="best|final|PATH",
                     help="Which adapter of the run: best/ (the default when the run has one), final (adapters/) or a folder.")(f)
    return click.argument("target")(f)


def sampling_options(f):
    f = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of sampling.")(f)
    f = click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1 = off).")(f)
    f = click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")(f)
    return click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                        help="Most tokens generated per reply.")(f)


def read_rows(path: Path) -> list[Any]:
    """The JSONL file's rows (any JSON value per line; blank lines skipped)."""
    if not path.is_file():
        raise MlxtuneError(f"--file {path}: file not found")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MlxtuneError(f"{path}:{n}: not valid JSON ({e.msg}); write one row per line, e.g. "
                                   '{"prompt": "..."}, a record of the run\'s data format, or a JSON string') from None
    if not rows:
        raise MlxtuneError(f"{path}: no rows; write one JSON row per line")
    return rows


@click.command("generate")
@target_options
@click.argument("prompts", nargs=-1)
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSONL of prompts: {\"prompt\": ...}, records of the run's data format, or JSON strings.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write JSONL rows {index, input, output} here (default with --file: stdout).")
@sampling_options
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Prompts per generation batch.")
@no_progress_option("No progress bar.")
def generate_cmd(target: str, adapter: str | None, base: bool, backend: str | None, prompts: tuple[str, ...],
                 file: Path | None, out: Path | None, max_tokens: int, temperature: float, top_p: float, seed: int,
                 batch_size: int, no_progress: bool) -> None:
    """Generate replies to PROMPTS (or to the rows of --file) with TARGET's model. TARGET is a run
    directory (each prompt rendered in the run's own template with its system prompt; adapter best/ by
    default) or a model folder such as a merged export or embedded:smollm2-135m-instruct (no adapter;
    the tokenizer's chat template). One prompt is streamed to the terminal; many are batched by
    length; --file writes JSONL. The run's eval.stop strings apply.
    """
    from mlxtune.cli.ui import RichProgress
    from mlxtune.evaluation.chat import row_prompt, stream_one
    from mlxtune.evaluation.generation import GenSettings, generate_texts
    from mlxtune.files import write_text_atomic

    if bool(prompts) == bool(file):
        raise MlxtuneError("give prompts on the command line or --file prompts.jsonl (one of the two)")
    rows: list[Any] = read_rows(file) if file else list(prompts)
    t = resolve_target(target, adapter, base)
    settings = GenSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           batch_size=batch_size, stop=tuple(t.recipe.eval.stop))
    model, tokenizer, _, t = load_target(t, backend)
    where = (lambda i: f"{file}: row {i + 1}") if file else (lambda i: f"prompt {i + 1}")
    ids = [row_prompt(row, t.recipe.data, tokenizer, where(i)) for i, row in enumerate(rows)]
    on = t.adapter is not None
    if len(ids) == 1 and not file and out is None:
        stream_one(model, tokenizer, ids[0], settings, lambda s: click.echo(s, nl=False), adapter=on)
        click.echo()
        return
    progress = RichProgress() if file and not no_progress else None
    texts = generate_texts(model, tokenizer, ids, settings, adapter=on, progress=progress)
    if not file and out is None:
        for row, text in zip(rows, texts):
            click.echo(f"> {row}\n{text}\n")
        return
    lines = "".join(json.dumps({"index": i, "input": row, "output": text}, ensure_ascii=False) + "\n"
                    for i, (row, text) in enumerate(zip(rows, texts)))
    if out is None:
        click.echo(lines, nl=False)
    else:
        write_text_atomic(out, lines)
        click.echo(f"{len(texts)} outputs written to {out}", err=True)
