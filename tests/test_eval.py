"""The eval layer end to end: recipe checks, best/ by a generation metric, `mlxtune eval`,
report.md + loss.png, and `mlxtune compare` over N runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlxtune.cli.main import cli
from mlxtune.recipe.loading import load_recipe

from conftest import write_jsonl


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_png(path: Path) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.mark.parametrize("override, words", [
    ("eval.metrics=['rouge']", ["eval.metrics", "'rouge'", "bleu, chrf, pass@k, cefr"]),
    ("eval.best_metric='bleu'", ["eval.best_metric = 'bleu'", "eval_loss, eval_loss_full", "eval.metrics"]),
    ("eval.metrics=['pass@k']", ['"pass@k" needs data.format = "code"']),
    ("eval.metrics=['cefr']", ['"cefr" needs data.format = "cefr_list"']),
    ("eval.samples=4", ["eval.temperature > 0"]),
])
def test_eval_keys_are_checked(tiny_recipe, override, words):
    res = invoke("validate", tiny_recipe(), "--set", override)
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.output


def test_eval_key_combinations_that_work(tiny_recipe):
    r = load_recipe(tiny_recipe(), ["eval.metrics=['bleu', 'chrf']", "eval.best_metric='chrf'"])
    assert r.eval.metric_names() == ["eval_loss", "eval_loss_full", "bleu", "chrf"]
    r = load_recipe(tiny_recipe(), ["data.format='code'", "eval.metrics=['pass@k']", "eval.samples=5",
                                    "eval.temperature=0.8", "eval.pass_k=[1, 5]", "eval.best_metric='pass@5'"])
    assert r.eval.metric_names()[-2:] == ["pass@1", "pass@5"]


def test_run_with_bleu_writes_report_plot_and_generations(tiny_recipe):
    path = tiny_recipe()
    res = invoke("run", path, "--backend", "torch", "--no-progress", "--set", "eval.metrics=['bleu', 'chrf']",
                 "--set", "eval.max_new_tokens=8", "--set", "eval.best_metric='chrf'")
    assert res.exit_code == 0, res.output
    run = path.parent / "runs" / "tiny"
    evs = [e for e in events(run) if e["event"] == "eval"]
    assert [(e["step"], e["adapter"]) for e in evs] == [(0, False), (6, True), (12, True)]
    for e in evs:
        assert 0.0 <= e["bleu"] <= 100.0 and 0.0 <= e["chrf"] <= 100.0
        assert e["bleu_signature"].startswith("nrefs:1") and e["generated"] == 12
    best = json.loads((run / "best" / "state.json").read_text())
    assert best["metric"] == "chrf" and best["value"] == max(e["chrf"] for e in evs[1:])
    gens = [json.loads(line) for line in (run / "generations" / "step-000012.jsonl").read_text().splitlines()]
    assert len(gens) == 12 and all(len(g["outputs"]) == 1 and g["reference"] for g in gens)
    assert (run / "generations" / "base.jsonl").is_file()
    report = (run / "report.md").read_text()
    for text in ("## Base vs fine-tuned", "eval loss (response only)", "perplexity (full text)", "% lower",
                 "| BLEU |", "| chrF |", "points", "sacrebleu bleu signature", "## Evals during training",
                 "12 (best)" if best["step"] == 12 else "6 (best)", "![train and eval loss](loss.png)"):
        assert text in report, text
    assert_png(run / "loss.png")


def test_best_checkpoint_by_a_higher_is_better_metric(tiny_model_dir, tmp_path):
    """best/ follows the recipe's metric and its direction, not the eval loss."""
    from mlxtune.training import loop
    from mlxtune.data.batching import eval_batches
    from mlxtune.evaluation.scoring import evaluate
    from mlxtune.data.records import Example
    from mlxtune.runs.rundir import RunDir
    from mlxtune.training.session import load_backend_with_adapter

    import numpy as np

    (tmp_path / "d.jsonl").write_text("")
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, "prompt_completion", "d.jsonl"),
                         ["eval.metrics=['bleu']", "eval.best_metric='bleu'", "train.steps=6", "train.eval_every=2"])
    backend = load_backend_with_adapter("torch", tiny_model_dir, recipe)
    backend.setup_optimizer(recipe)
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(3, 50, 10).astype(np.int32), np.r_[np.zeros(5, bool), np.ones(5, bool)]) for _ in range(8)]
    bleus = {0: 1.0, 2: 5.0, 4: 30.0, 6: 10.0}  # rises, then falls while the loss keeps falling

    def score_fn(adapter: bool, step: int) -> dict:
        return {**evaluate(backend, evals, adapter=adapter), "bleu": bleus[step]}

    evals = eval_batches(examples[:2], 2, 0)
    run = RunDir.create(tmp_path / "run")
    summary = loop.train(backend, examples, evals, recipe.train, recipe.eval, run, 0, score_fn=score_fn)
    assert summary["best_step"] == 4 and summary["best"] == 30.0
    assert json.loads((run.path / "best" / "state.json").read_text())["step"] == 4


def write_recipe(tmp_path: Path, model_dir: Path, fmt: str, data: str, extra: str = "") -> Path:
    p = tmp_path / f"{fmt}.toml"
    p.write_text(f'''
[model]
path = "{model_dir}"
[adapter]
rank = 4
alpha = 8
[data]
train = "{data}"
format = "{fmt}"
eval_fraction = 0.25
max_seq_len = 96
[train]
steps = 4
lr = 1e-2
micro_batch = 2
save_every = 2
keep_checkpoints = 0
eval_every = 2
[output]
dir = "{tmp_path / 'runs'}"
name = "{fmt}"
{extra}''')
    return p


CODE_RECORDS = [
    {"problem": f"def add_{i}(x): return x plus {i}", "solution": f"def add_{i}(x):\n    return x + {i}",
     "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n", "entry_point": f"add_{i}"}
    for i in range(8)
]


def test_pass_at_k_scoring_through_the_sandbox(tiny_recipe):
    """Generated code -> program -> sandbox -> pass@k, with hand-written completions."""
    from mlxtune.evaluation.scoring import score_outputs

    r = load_recipe(tiny_recipe(), ["data.format='code'", "eval.metrics=['pass@k']", "eval.samples=2",
                                    "eval.temperature=0.5", "eval.pass_k=[1, 2]"])
    good = "```python\ndef add_{i}(x):\n    return x + {i}\n```"
    bad = "```python\ndef add_{i}(x):\n    return x - 1\n```"
    outputs = [[good.format(i=0), good.format(i=0)], [good.format(i=1), bad.format(i=1)], [bad.format(i=2), "while True: pass"]]
    res, rows = score_outputs(CODE_RECORDS[:3], outputs, r)
    assert res["pass@1"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert res["pass@2"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert [o["status"] for o in rows[1]["outcomes"]] == ["pass", "fail"]
    assert rows[2]["outcomes"][0]["status"] == "fail"
    nets = {o["network"] for r in rows for o in r["outcomes"]}  # generations/ say which protection was in force
    assert len(nets) == 1 and nets <= {"namespace", "audit hook"}


def test_eval_checkpoints_all_for_a_code_recipe(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "code.jsonl", CODE_RECORDS)
    path = write_recipe(tmp_path, tiny_model_dir, "code", "code.jsonl",
                        "[eval]\nmetrics = ['pass@k']\nbest_metric = 'pass@1'\nmax_new_tokens = 6\nsandbox_timeout = 5.0\n")
    res = invoke("run", path, "--backend", "torch", "--no-progress")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "code"
    res = invoke("eval", path, "--backend", "torch", "--checkpoints", "all", "--no-progress")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in rows] == ["base", "step-2", "best", "final"]
    assert [r["step"] for r in rows] == [0, 2, rows[2]["step"], 4]
    assert all(0.0 <= r["metrics"]["pass@1"] <= 1.0 and r["metrics"]["generated"] == 2 for r in rows)
    # the final adapter scores what the training loop logged at its last eval
    last = [e for e in events(run) if e["event"] == "eval"][-1]
    assert rows[-1]["metrics"]["loss"] == pytest.approx(last["loss"], rel=1e-5)
    assert rows[-1]["metrics"]["pass@1"] == last["pass@1"]
    assert "pass@1" in res.output and "step-2" in res.output
    report = (run / "report.md").read_text()
    assert "## Checkpoints scored by `mlxtune eval`" in report and "| step-2" in report and "Best by pass@1" in report
    assert (run / "generations" / "eval-step-2.jsonl").is_file()


def test_eval_errors(tiny_recipe):
    path = tiny_recipe()
    res = invoke("eval", path, "--backend", "torch")
    assert res.exit_code == 2 and "holds no run" in res.output and "--base" in res.output
    res = invoke("eval", path, "--base", "--checkpoints", "all")
    assert res.exit_code == 2 and "--base scores only the base model" in res.output


def test_eval_base_only_without_a_run(tiny_recipe):
    res = invoke("eval", tiny_recipe(), "--backend", "torch", "--base", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "base" in res.output and "eval loss (response)" in res.output


def fake_run(path: Path, backend: str, method: str, losses: list[float], bleu: float) -> Path:
    path.mkdir(parents=True)
    lines = [{"event": "start", "step": 0, "backend": {"device": "cpu"}, "trainable_parameters": 1000}]
    lines.append({"event": "eval", "step": 0, "adapter": False, "loss": 3.0, "loss_full": 3.5, "ppl": 20.1, "ppl_full": 33.1, "bleu": 1.0})
    for i, loss in enumerate(losses, 1):
        lines.append({"event": "train", "step": i, "epoch": 0, "loss": loss, "tokens_per_s": 100.0, "peak_memory": 2**30})
    lines.append({"event": "eval", "step": len(losses), "adapter": True, "loss": losses[-1], "loss_full": 2.0,
                  "ppl": 5.0, "ppl_full": 7.4, "bleu": bleu})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (path / "recipe.resolved.toml").write_text(f'backend = "{backend}"\n[adapter]\nmethod = "{method}"\n[model]\npath = "m"\n')
    return path


def test_compare_n_runs_table_and_overlaid_plot(tmp_path):
    runs = [fake_run(tmp_path / n, b, m, [2.5, 2.0, 1.5 + j / 10], 10.0 + j)
            for j, (n, b, m) in enumerate([("lora-mlx", "mlx", "lora"), ("lora-torch", "torch", "lora"), ("other", "torch", "lora")])]
    res = invoke("compare", *runs, "--plot", tmp_path / "cmp.png", "--markdown", tmp_path / "cmp.md")
    assert res.exit_code == 0, res.output
    table = (tmp_path / "cmp.md").read_text().splitlines()
    assert table[0].startswith("| run | backend | method |") and "BLEU" in table[0]
    assert len(table) == 2 + 3 and "| lora-torch | torch | lora | 1,000 | 1.6000 | 46.7% |" in table[3]
    assert_png(tmp_path / "cmp.png")
