"""Every shipped recipe: it validates, the planner reads it, recipes/README.md lists it, and it
trains for a couple of steps on the embedded SmolLM2-135M on both backends with the override the
recipe's header documents (plus size limits so the smoke stays short)."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxtune.cli.main import cli
from mlxtune.errors import MlxtuneError
from mlxtune.recipe.loading import load_recipe

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
EXPERIMENTS = [p for p in RECIPES if p.stem != "quickstart"]  # the quickstart has its own end-to-end test
EMBEDDED = 'model.path="embedded:smollm2-135m-instruct"'


def ids(paths):
    return [p.stem for p in paths]


def test_the_experiments_are_all_there():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "cefr_a1_lora", "cefr_a2_lora", "en_tr_lora", "en_tr_qlora", "en_tr_prefix", "en_tr_prompt",
            "code_deep", "code_diverse"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_validates(path):
    recipe = load_recipe(path)
    recipe.check_trainable()
    for key in ("train", "eval"):
        value = getattr(recipe.data, key)
        if value:
            assert Path(recipe.resolve_path(value)).is_file(), f"{path.name}: data.{key} = {value} is missing"
    out = CliRunner().invoke(cli, ["validate", str(path), "--backend", "mlx"])
    assert out.exit_code == 0, out.output
    assert ": ok" in out.output


def readme_row(path: Path) -> list[str]:
    """The recipe's row of the memory table in recipes/README.md, as cells."""
    for line in (ROOT / "recipes" / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"| `{path.name}` | ") and line.count("|") == 6:
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"recipes/README.md has no memory row for {path.name}")


@pytest.mark.parametrize("path", RECIPES, ids=ids(RECIPES))
def test_recipe_plans_for_both_machines(path):
    # the verdicts recipes/README.md quotes: a 16 GB Mac (MLX) and a 24 GB GPU (torch)
    row = readme_row(path)
    for backend, budget, cell in (("mlx", "16GB", row[3]), ("torch", "24GB", row[4])):
        out = CliRunner().invoke(cli, ["plan", str(path), "--budget", budget, "--backend", backend])
        if "does not fit" in cell:
            assert out.exit_code == 1 and "does not fit" in out.output, out.output
        else:
            assert out.exit_code == 0 and "fits:" in out.output, out.output


def test_recipes_readme_lists_every_recipe():
    text = (ROOT / "recipes" / "README.md").read_text(encoding="utf-8")
    for path in RECIPES:
        assert f"`{path.name}`" in text, f"recipes/README.md does not list {path.name}"


def test_recipe_headers_document_the_offline_override():
    for path in EXPERIMENTS:
        text = path.read_text(encoding="utf-8")
        assert f"--set {EMBEDDED.replace(chr(34), '')}" in text, f"{path.name}: no offline override in its header"


def smoke_overrides(path: Path, out_dir: Path) -> list[str]:
    """The documented override plus limits that keep the smoke run short on a CPU."""
    recipe = load_recipe(path)
    sets = [EMBEDDED, 'model.dtype="float32"', "train.epochs=0", "train.steps=2", "train.micro_batch=1",
            "train.grad_accum=1", "train.effective_batch=0", "train.warmup_ratio=0.0", "train.warmup_steps=0",
            "train.eval_every=0", "train.save_every=0", "eval.before=true", "eval.batch_size=2",
            "data.max_examples=12", "data.max_eval_examples=2", "data.max_seq_len=512",
            "eval.generate_examples=1", "eval.max_new_tokens=8",
            f"output.dir={json.dumps(str(out_dir))}", f'output.name="{path.stem}"']
    if recipe.data.eval:  # a separate eval file: no held-out split
        sets.remove("data.max_examples=12")
        sets.append("data.max_examples=6")
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("path", EXPERIMENTS, ids=ids(EXPERIMENTS))
def test_recipe_smoke_on_the_embedded_model(path, backend, tmp_path, embedded_model_dir):
    from mlxtune.runs.rundir import split_events
    from mlxtune.training.session import run

    recipe = load_recipe(path, smoke_overrides(path, tmp_path))
    if backend == "torch" and recipe.model.quantize_bits:
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            with pytest.raises(MlxtuneError, match="CUDA"):
                run(recipe, backend)
            return
    run_dir, summary = run(recipe, backend)
    events = run_dir.events()
    start, base, evals = split_events(events)
    trains = [e for e in events if e["event"] == "train"]
    assert len(trains) == 2 and all(e["loss"] > 0 for e in trains)
    assert base is not None and evals, "no base or adapter eval"
    final = evals[-1]
    for metric in recipe.eval.metric_names():
        key = {"eval_loss": "loss", "eval_loss_full": "loss_full"}.get(metric, metric)
        assert key in final, f"{metric} missing from the final eval"
        assert key in base, f"{metric} missing from the base eval"
    assert start["trainable_parameters"] > 0
    assert (run_dir.path / "report.md").is_file()
    assert any((run_dir.path / "adapters").iterdir())
