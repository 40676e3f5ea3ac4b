"""The benchmark harness (bench/) and the torch backend's speed switches it measures."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.recipe.loading import load_recipe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.summary import markdown, ratios, summarize  # noqa: E402
from conftest import TINY_RECIPE_HEAD  # noqa: E402
from bench.train_bench import bench_recipe  # noqa: E402

BENCH_RECIPE = TINY_RECIPE_HEAD + """
[train]
lr = 1e-2
schedule = "{schedule}"
micro_batch = 4
grad_clip = 0.0

[eval]
batch_size = 4
before = false
"""


@pytest.fixture
def bench_toml(tmp_path, tiny_model_dir):
    from conftest import TINY_RECORDS, write_jsonl

    write_jsonl(tmp_path / "train.jsonl", TINY_RECORDS * 4)

    def write(schedule: str = "constant") -> Path:
        path = tmp_path / f"bench-{schedule}.toml"
        path.write_text(BENCH_RECIPE.format(model=tiny_model_dir, schedule=schedule))
        return path

    return write


def _steps(seconds, trained, padded, real=None):
    return [{"seconds": s, "trained": t, "padded": p, "real": r, "loss": 1.0 + i}
            for i, (s, t, p, r) in enumerate(zip(seconds, trained, padded, real or padded))]


def test_summary_leaves_out_warmup_and_divides_totals():
    steps = _steps([10.0, 2.0, 3.0], [100, 40, 60], [400, 100, 100], [300, 80, 70])
    s = summarize(steps, warmup=1)
    assert s["timed_steps"] == 2
    assert s["trained_tok_s"] == pytest.approx(100 / 5.0)  # the slow first step is not counted
    assert s["processed_tok_s"] == pytest.approx(200 / 5.0)
    assert s["padding_share"] == pytest.approx(1 - 150 / 200)
    assert s["step_time_s"] == pytest.approx(2.5)
    assert (s["train_loss_last"], s["train_loss_mean"]) == (3.0, 2.5)


def test_ratios_are_mlxtune_over_raw_with_targets():
    fast = summarize(_steps([1.0, 1.0], [130, 130], [200, 200]), 0)
    slow = summarize(_steps([1.0, 1.0], [100, 100], [200, 200]), 0)
    variants = {
        "trl": {**slow, "peak_framework": 100, "peak_rss_wait4": 100},
        "mlxtune-torch": {**fast, "peak_framework": 90, "peak_rss_wait4": 95},
        "mlx_lm": {**fast, "peak_framework": 100, "peak_rss_wait4": 100},
        "mlxtune-mlx": {**slow, "peak_framework": 80, "peak_rss_wait4": 100},
    }
    r = ratios(variants)
    assert r["torch"]["trained_tok_s"] == pytest.approx(1.3) and r["torch"]["meets_targets"]
    assert r["torch"]["memory"] == pytest.approx(0.9) and r["torch"]["rss"] == pytest.approx(0.95)
    assert r["mlx"]["trained_tok_s"] == pytest.approx(100 / 130) and not r["mlx"]["meets_targets"]
    assert "torch" not in ratios({k: v for k, v in variants.items() if k != "trl"})


def test_bench_refuses_settings_the_tools_cannot_share(bench_toml):
    with pytest.raises(MlxtuneError, match="train.schedule = 'cosine'"):
        bench_recipe(bench_toml("cosine"), steps=2, warmup=1)
    recipe = bench_recipe(bench_toml(), steps=2, warmup=1)
    assert recipe.train.steps == 3


# ---------------------------------------------------------------- torch speed switches

torch = pytest.importorskip("torch")


def _train(recipe_path, overrides, steps=3):
    from mlxtune.data.batching import train_stream
    from mlxtune.models.source import pad_id
    from mlxtune.training.session import load_backend_with_adapter, prepare

    recipe = load_recipe(recipe_path, overrides)
    model_dir, tok, data = prepare(recipe)
    backend = load_backend_with_adapter("torch", model_dir, recipe)
    backend.setup_optimizer(recipe)
    stream = train_stream(data.train, 4, 0, True, pad_id(tok))
    losses = []
    for _ in range(steps):
        b = next(stream)
        losses.append(backend.train_step(b.tokens, b.mask, b.n_targets, update=True, lr=1e-2) / b.n_targets)
    return backend, losses


def test_adamw_implementations_agree(bench_toml):
    """foreach (the CPU default) is bit-identical to torch's one-tensor loop; fused within rounding."""
    weights = {}
    for impl in ("for_loop", "foreach", "fused"):
        backend, _ = _train(bench_toml(), [f"train.adamw_impl={impl}"])
        weights[impl] = backend.get_adapter_weights()
        assert backend.describe()["adamw"] == impl
    assert all(np.array_equal(weights["for_loop"][k], weights["foreach"][k]) for k in weights["foreach"])
    assert max(np.abs(weights["fused"][k] - weights["foreach"][k]).max() for k in weights["fused"]) < 1e-6
    auto, _ = _train(bench_toml(), [], steps=1)
    assert auto.describe()["adamw"] == "foreach"  # no CUDA in the test suite


def test_autocast_bf16_trains_close_to_fp32(bench_toml):
    _, loss32 = _train(bench_toml(), [])
    bf16, loss16 = _train(bench_toml(), ['train.autocast="bfloat16"'])
    assert bf16.describe()["autocast"] == "bfloat16"
    assert loss16 != loss32  # bf16 matmuls really ran
    assert np.allclose(loss16, loss32, rtol=0.02)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters() if p.requires_grad)  # the adapter stays fp32


# ---------------------------------------------------------------- the harness, end to end


def test_harness_runs_every_variant_on_the_tiny_model(bench_toml, tmp_path):
    """Two steps of each variant (one round) in their own processes, the common scorer, the result files.
    Timings are not checked: only that every number was measured and is consistent."""
    pytest.importorskip("trl")
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "train_bench.py"), "--recipe", str(bench_toml()), "--steps", "1",
           "--warmup", "1", "--rounds", "1", "--out", str(out), "--work", str(tmp_path / "work"), "--machine", "test"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result_file,) = out.glob("*-test.json")
    result = json.loads(result_file.read_text())
    expected = {"trl", "mlxtune-torch"} | ({"mlx_lm", "mlxtune-mlx"} if not result["skipped"] else set())
    assert set(result["variants"]) == expected
    for name, v in result["variants"].items():
        assert len(v["steps"]) == 2 and v["timed_steps"] == 1, name
        assert v["trained_tok_s"] > 0 and v["peak_framework"] > 0 and v["peak_rss_wait4"] > 0, name
        assert 0 < v["trained_per_step"] <= v["steps"][1]["real"] <= v["steps"][1]["padded"], name
        assert np.isfinite(v["eval_loss_common"]), name
    # the same adapter through mlxtune's own eval and through the common scorer
    mt = result["variants"]["mlxtune-torch"]
    assert mt["eval_loss_own"] == pytest.approx(mt["eval_loss_common"], abs=2e-3)
    assert set(result["ratios"]) == ({"torch", "mlx"} if "mlx_lm" in expected else {"torch"})
    table = result_file.with_suffix(".md").read_text()
    assert table == markdown(result) and all(f"| {n} |" in table for n in expected)
