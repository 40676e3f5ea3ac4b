"""`mlxtune plan R`: the memory breakdown and the batch plan (mlxtune/planning/planner.py) as a table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mlxtune.cli.options import backend_option, recipe_argument, set_option
from mlxtune.recipe.loading import load_recipe
from mlxtune.units import gib

if TYPE_CHECKING:
    from rich.console import Console

    from mlxtune.planning.planner import Plan
    from mlxtune.recipe.schema import Recipe


@click.command("plan")
@recipe_argument
@click.option("--budget", help='Memory the run may use, e.g. 16GB or 10GiB (default: train.memory_budget, else the device\'s).')
@backend_option("Plan for this backend (default: the recipe's).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, exists=True),
              help="The model's config.json, when the recipe's model is not on this machine.")
@click.option("--seq-len", type=click.IntRange(min=1), default=None, help="Typical example length to choose the micro batch for (default: data.max_seq_len).")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Processes that train together (data parallel): the plan is one device's (default: the launcher's, else 1).")
@set_option
def plan_cmd(recipe: str, budget: str | None, backend: str | None, config_file: str | None, seq_len: int | None,
             world_size: int | None, overrides: tuple[str, ...]) -> None:
    """Predict peak memory (weights, adapter, activations, loss) of one device and the batch plan that fits."""
    from rich.console import Console

    from mlxtune.models.quantization import base_bits, mlx_label, torch_label, torch_problem
    from mlxtune.planning.planner import as_written, find_config, plan_recipe
    from mlxtune.training.backend_choice import resolve_backend
    from mlxtune.training.dist import detect_launch
    from pathlib import Path

    from mlxtune.training.session import backend_problem

    r = load_recipe(recipe, list(overrides), planning=True)
    name, _ = resolve_backend(backend or r.backend)
    config, note = find_config(r.model.path, config_file)
    launch = detect_launch()
    world, launcher = (world_size, None) if world_size else (launch.size or 1, launch.launcher)
    plan = plan_recipe(r, name, budget=budget, config=config, typical_len=seq_len, world_size=world, launcher=launcher)
    console = Console()
    render(plan, r, note, console)
    if mine := as_written(r, name, plan, config):
        verdict = "[green]fits[/]" if mine.fits else "[red]does not fit[/]"
        console.print(f"as written (micro_batch = {mine.micro_batch} x {mine.seq_len} tokens, checkpointing "
                      f"{'on' if mine.grad_checkpointing else 'off'}): predicted peak {gib(mine.estimate.total)}, {verdict}; "
                      'train.micro_batch = "auto" with train.effective_batch lets `mlxtune run` use the plan')
    if bits := base_bits(r):
        console.print("base quantized: " + (mlx_label(bits, r.model.quantize_group_size) if name == "mlx" else torch_label(bits)))
    if name == "torch" and (problem := torch_problem(r)):
        console.print(f"[red bold]cannot run on this machine:[/] {problem}")
    model_dir = Path(r.model.path)  # a local folder: the backend's own refusal, as `run` would meet it
    if (model_dir / "config.json").is_file() and (problem := backend_problem(name, model_dir)):
        console.print(f"[red bold]the {name} backend refuses this model:[/] {problem}")
        raise SystemExit(1)
    if not plan.fits:
        raise SystemExit(1)


def render(plan: Plan, recipe: Recipe, config_note: str, console: Console) -> None:
    """The breakdown as a rich table and the batch plan."""
    from mlxtune.cli.ui import new_table
    from mlxtune.planning.planner import MARGIN, no_fit_message

    e = plan.estimate
    title = (f"{recipe.model.path} on {plan.backend} ({plan.device}{', one of ' + str(plan.world_size) if plan.world_size > 1 else ''}), "
             f"{recipe.adapter.label}, "
             f"micro batch {max(plan.micro_batch, 1)} x {plan.typical_len} tokens, checkpointing "
             f"{'on' if plan.grad_checkpointing else 'off'}")
    table = new_table(("part", "GiB", "counted"), title=title, left=["part"], caption=f"model config: {config_note}")
    for name, value, counted in e.rows():
        table.add_row(name, f"{value / 2**30:.2f}", "yes" if counted else "no: only the larger of loss and backward")
    table.add_row("[bold]predicted peak", f"[bold]{e.total / 2**30:.2f}", "")
    table.add_row("budget", f"{plan.budget / 2**30:.2f}", f"{plan.budget_note}; plans use {MARGIN:.0%} of it")
    console.print(table)
    if not plan.fits:
        console.print(f"[red bold]does not fit:[/] {no_fit_message(plan)}")
        return
    shards = f" (base blocks sharded {plan.base_shards} ways: train.shard_base)" if plan.base_shards > 1 else ""
    world = f"world size {plan.world_size} ({plan.launcher or '--world-size'}): per device{shards}: " if plan.world_size > 1 else ""
    total = (f"; global batch = {plan.micro_batch} x {plan.grad_accum} x {plan.world_size} = {plan.global_batch}"
             if plan.world_size > 1 else "")
    console.print(f"[green bold]fits[/]: {world}micro_batch = {plan.micro_batch} x grad_accum = {plan.grad_accum} "
                  f"(effective batch {plan.effective_batch}{' per device' if plan.world_size > 1 else ''}), grad_checkpointing = {str(plan.grad_checkpointing).lower()}, "
                  f"max_batch_tokens = {plan.max_batch_tokens} (passes over it are split), "
                  f"longest sequence at one row per pass: {plan.longest_seq} tokens{total}")
