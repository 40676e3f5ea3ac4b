"""The `mlxtune` command. Imports no ML framework until a command needs one."""

from __future__ import annotations

import sys

import click

from mlxtune import __version__
from mlxtune.cli.compare import compare_cmd
from mlxtune.cli.doctor import doctor_cmd
from mlxtune.cli.evaluate import eval_cmd
from mlxtune.cli.export import export_cmd
from mlxtune.cli.generate import generate_cmd
from mlxtune.cli.chat import chat_cmd
from mlxtune.cli.options import backend_option, no_progress_option, recipe_argument, set_option
from mlxtune.cli.plan import plan_cmd
from mlxtune.errors import MlxtuneError
from mlxtune.recipe.loading import load_recipe


class UserError(click.ClickException):
    """An MlxtuneError as click shows it: one line on stderr, no traceback."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:  # type: ignore[override]
        click.secho(f"error: {self.format_message()}", fg="red", err=True)


class Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except MlxtuneError as e:
            raise UserError(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise UserError("interrupted; files written so far are complete (writes are atomic)", 130) from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlxtune")
def cli() -> None:
    """Fine-tune LLMs with LoRA-family adapters from one TOML recipe, on MLX or torch+peft."""


@cli.command()
@recipe_argument
@backend_option()
@set_option
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory of the same name.")
@click.option("--resume", is_flag=True, help="Continue the run from its newest checkpoint.")
@no_progress_option("No progress bar (metrics.jsonl is written either way).")
def run(recipe: str, backend: str | None, overrides: tuple[str, ...], overwrite: bool, resume: bool, no_progress: bool) -> None:
    """Train the recipe's adapter; writes runs/<name>/ and prints base vs fine-tuned eval."""
    if overwrite and resume:
        raise MlxtuneError("--overwrite and --resume exclude each other")
    from mlxtune.cli.ui import RichTrainUI, err_console, print_summary
    from mlxtune.training.session import run as run_recipe

    r = load_recipe(recipe, list(overrides))
    run_dir, summary = run_recipe(r, backend, overwrite=overwrite, resume=resume, ui=RichTrainUI(bar=not no_progress))
    from mlxtune.training.dist import detect_launch

    if detect_launch().rank != 0:  # under a launcher rank 0 alone reports
        return
    print_summary(summary)
    err_console().print(f"run directory: [bold]{run_dir.path}[/] (adapters/, best/, metrics.jsonl, report.md, loss.png)")


@cli.command()
@recipe_argument
@backend_option("Check for this backend on this machine (default: the recipe's; auto = what `run` would pick).")
@set_option
def validate(recipe: str, backend: str | None, overrides: tuple[str, ...]) -> None:
    """Check a recipe (keys, types, combinations, data files) without loading a model."""
    from pathlib import Path

    from mlxtune.models.quantization import base_bits, mlx_label, torch_label, torch_problem
    from mlxtune.training.backend_choice import resolve_backend
    from mlxtune.training.session import backend_problem

    r = load_recipe(recipe, list(overrides))
    name, _ = resolve_backend(backend or r.backend)
    if name == "torch" and (problem := torch_problem(r)):
        raise MlxtuneError(f"{recipe}: {problem}")
    model_dir = Path(r.model.path)  # a local folder: the backend's own refusal, as `run` would meet it
    if (model_dir / "config.json").is_file() and (problem := backend_problem(name, model_dir)):
        raise MlxtuneError(f"{recipe}: model.path = {r.model.path}: {problem}" + ("; use --backend torch" if name == "mlx" else ""))
    for key in ("train", "eval"):
        value = getattr(r.data, key)
        if value and Path(value).suffix and not Path(r.resolve_path(value)).is_file():
            raise MlxtuneError(f"{recipe}: data.{key} = {value!r}: file not found (relative paths are resolved against the recipe's folder)")
    bits = base_bits(r)
    quant = (mlx_label(bits, r.model.quantize_group_size) if name == "mlx" else torch_label(bits)) if bits else ""
    click.echo(f"{recipe}: ok ({r.adapter.label} on {r.model.path}"
               + (f", base quantized: {quant}" if quant else "") + f", data {r.data.format} from {r.data.train}; backend {name})")


@cli.group(cls=Group)
def data() -> None:
    """Inspect what the model will be trained on."""


@data.command("show")
@recipe_argument
@click.option("-n", "count", type=click.IntRange(min=0), default=2, show_default=True, help="Examples to print.")
@click.option("--split", type=click.Choice(["train", "eval"]), default="train", show_default=True)
@set_option
def data_show(recipe: str, count: int, split: str, overrides: tuple[str, ...]) -> None:
    """Print rendered examples with the trained tokens marked, and length statistics."""
    from rich.console import Console
    from rich.text import Text

    from mlxtune.training.session import mask_preview, prepare

    r = load_recipe(recipe, list(overrides))
    _, tokenizer, ds = prepare(r)
    console = Console()
    examples = ds.train if split == "train" else ds.eval
    for i, ex in enumerate(examples[:count]):
        console.rule(f"{split} example {i + 1}: {len(ex)} tokens, {int(ex.loss_mask.sum())} trained")
        text = Text()
        for chunk, trained in mask_preview(ex.tokens, ex.loss_mask, tokenizer):
            text.append("⟦" + chunk + "⟧" if trained else chunk, style="bold green" if trained else "dim")
        console.print(text)
    console.rule("legend: ⟦trained tokens⟧, the rest is context only")
    for name, st in ds.stats.items():
        s = st.summary()
        console.print(f"{name}: {s['examples']} examples from {s['records']} records; tokens per example min {s['min_len']} / mean {s['mean_len']} / max {s['max_len']}; "
                      f"over max_seq_len={r.data.max_seq_len}: {s['overlong']} (truncated {s['truncated']}, dropped {s['dropped']})")


@cli.command()
@click.option("--markdown", is_flag=True, help="Print as the README's markdown tables.")
def keys(markdown: bool) -> None:
    """List every recipe key with its type, default and meaning."""
    from mlxtune.recipe.loading import reference_markdown

    text = reference_markdown()
    if not markdown:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(text))
    else:
        click.echo(text, nl=False)


cli.add_command(eval_cmd)
cli.add_command(compare_cmd)
cli.add_command(plan_cmd)
cli.add_command(doctor_cmd)
cli.add_command(export_cmd)
cli.add_command(generate_cmd)
cli.add_command(chat_cmd)


def main() -> None:
    from mlxtune.system.blas import command_uses_mlx, maybe_reexec_with_openblas

    if command_uses_mlx(sys.argv[1:]):
        maybe_reexec_with_openblas(sys.argv)
    cli()
