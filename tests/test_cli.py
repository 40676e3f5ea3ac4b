"""`mlxtune` end to end on a tiny random Llama, and the clear errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxtune.cli.main import cli

ROOT = Path(__file__).parent.parent


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_run_writes_run_directory_and_learns(tiny_recipe):
    path = tiny_recipe()
    res = invoke("run", path, "--backend", "torch", "--no-progress")
    assert res.exit_code == 0, res.output
    run = path.parent / "runs" / "tiny"
    for f in ("recipe.resolved.toml", "metrics.jsonl", "report.md", "adapters/adapter_model.safetensors",
              "adapters/adapter_config.json", "best/adapter/adapter_model.safetensors", "best/state.json"):
        assert (run / f).is_file(), f
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in train] == list(range(1, 13))
    assert train[-1]["loss"] < train[0]["loss"] - 0.3  # a random 2-block model: slow but clear progress
    base = evals[0]
    assert base["adapter"] is False and base["step"] == 0
    assert [e["step"] for e in evals[1:]] == [6, 12]
    assert evals[-1]["loss"] < base["loss"] - 0.3 and evals[-1]["loss_full"] < base["loss_full"]
    report = (run / "report.md").read_text()
    assert "eval loss (response only)" in report and "perplexity (full text)" in report
    assert "base vs fine-tuned" in res.output
    resolved = (run / "recipe.resolved.toml").read_text()
    assert 'backend = "torch"' in resolved and "lr = 0.01" in resolved
    best = json.loads((run / "best" / "state.json").read_text())
    assert best["value"] == min(e["loss"] for e in evals[1:])


def test_saved_adapter_loads_with_peft(tiny_recipe, tiny_model_dir):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = tiny_recipe()
    assert invoke("run", path, "--backend", "torch", "--no-progress", "--set", "output.name=peft").exit_code == 0
    adapter = path.parent / "runs" / "peft" / "adapters"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    w = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert torch.count_nonzero(w) > 0
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


def test_existing_run_is_refused_without_overwrite(tiny_recipe):
    path = tiny_recipe()
    args = ("run", path, "--backend", "torch", "--no-progress", "--set", "train.steps=2", "--set", "train.eval_every=0")
    assert invoke(*args).exit_code == 0
    res = invoke(*args)
    assert res.exit_code == 2 and "already holds a run" in res.output and "--overwrite" in res.output
    assert invoke(*args, "--overwrite").exit_code == 0
    res = invoke(*args, "--resume")
    assert res.exit_code == 2 and "no checkpoint" in res.output


def test_run_prints_notes_bar_and_summary(tiny_recipe):
    """What `mlxtune run` prints around training: the notes, the bar (drawn once at the end when
    the output is not a terminal) and the closing table."""
    from mlxtune.training.backend_choice import apple_silicon, resolve_backend

    res = invoke("run", tiny_recipe(), "--backend", "auto", "--set", "train.steps=2", "--set", "output.name=notes")
    assert res.exit_code == 0, res.output
    name, note = resolve_backend("auto")
    assert note == f"auto: {'Apple Silicon' if apple_silicon() else 'not Apple Silicon'}; choose with --backend"
    lines = res.output.splitlines()
    assert lines[0] == f"backend: {name} ({note})"
    assert lines[1].startswith("data: 36 train / 12 eval examples, ")
    assert any(line.startswith("model: ") and "trainable parameters: 8,192" in line for line in lines)
    assert any(line.startswith("train ") and "2/2 loss " in line and " tok/s  eval " in line for line in lines)
    assert "base vs fine-tuned on the eval split" in res.output and "trained tokens/s" in res.output
    assert "run directory: " in res.output and res.output.rstrip().endswith("metrics.jsonl, report.md, loss.png)")


@pytest.mark.parametrize("override, words", [
    ("data.train=missing.jsonl", ["data file not found", "missing.jsonl"]),
    ("data.max_seq_len=8", ["longer than data.max_seq_len = 8", "overlong"]),
    ("model.path=/nonexistent/model", ["/nonexistent/model"]),
    ("model.path=some-org/missing-model", ["some-org/missing-model"]),
    ("adapter.target_modules=['qkv']", ["'qkv'", "q_proj"]),
    ("train.lrr=1", ["unknown key 'train.lrr'"]),
])
def test_bad_input_one_line_error_no_traceback(tiny_recipe, override, words, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = invoke("run", tiny_recipe(), "--backend", "torch", "--no-progress", "--set", override)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in res.output and len(errors) == 1, res.output
    for w in words:
        assert w in errors[0]


def test_missing_column_names_row_and_fix(tiny_recipe):
    path = tiny_recipe()
    (path.parent / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"question": "a", "answer": "b"}\n')
    res = invoke("validate", path, "--set", "data.train=bad.jsonl")
    assert res.exit_code == 0  # validate checks the recipe; data rows are checked when read
    res = invoke("data", "show", path, "--set", "data.train=bad.jsonl")
    assert res.exit_code == 2 and "bad.jsonl: record 2: missing field(s) prompt, completion" in res.output
    assert "data.columns" in res.output


def test_validate_and_keys():
    res = invoke("validate", ROOT / "recipes" / "quickstart.toml")
    assert res.exit_code == 0 and "ok" in res.output
    res = invoke("validate", ROOT / "recipes" / "nope.toml")
    assert res.exit_code == 2 and "recipe file not found" in res.output
    assert "`max_seq_len`" in invoke("keys", "--markdown").output


def test_data_show_marks_trained_tokens(tiny_recipe):
    res = invoke("data", "show", tiny_recipe(), "-n", "1")
    assert res.exit_code == 0, res.output
    assert "⟦" in res.output and "trained" in res.output and "tokens per example" in res.output


def test_core_imports_no_framework():
    """`mlxtune --help`, validate and the core modules work without torch or mlx."""
    code = (
        "import sys\n"
        "import mlxtune.cli.main, mlxtune.recipe.schema, mlxtune.data.records, mlxtune.data.batching, mlxtune.training.loop, mlxtune.runs.rundir, "
        "mlxtune.training.session, mlxtune.models.source, mlxtune.adapters.lora, mlxtune.runs.report, mlxtune.evaluation.scoring, mlxtune.cli.evaluate, "
        "mlxtune.runs.plots, mlxtune.runs.compare, mlxtune.evaluation.generation, mlxtune.evaluation.metrics, mlxtune.evaluation.sandbox, mlxtune.planning.memory, mlxtune.adapters.virtual, backends\n"
        "from mlxtune.cli.main import cli\n"
        "from click.testing import CliRunner\n"
        "assert CliRunner().invoke(cli, ['--help']).exit_code == 0\n"
        "bad = [m for m in ('torch', 'mlx', 'transformers', 'peft', 'datasets', 'sacrebleu', 'matplotlib', 'cefrpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_backends_do_not_import_each_other():
    import ast

    for mod, other in (("torch_peft", "mlx"), ("apple_mlx", "torch")):
        tree = ast.parse((ROOT / "backends" / f"{mod}.py").read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] == other or n.startswith("backends.")], (mod, names)
