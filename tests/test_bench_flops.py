"""Model FLOPs, the measured matmul rate and MFU in the benchmark's tables (issue 18)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import matmul_rate  # noqa: E402
from bench.summary import markdown, mfu_of, model_flops, summarize  # noqa: E402

TINY_CFG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}


def _steps():
    # (seconds, trained, padded) per step, 4 rows each; the first is the warm-up
    return [{"seconds": s, "trained": t, "padded": p, "real": p, "loss": 1.0}
            for s, t, p in [(9.0, 10, 40), (1.0, 20, 80), (3.0, 60, 160)]]


def test_model_flops_weights_each_step_by_its_width_and_share():
    seen = []

    def per_position(width, share):
        seen.append((width, share))
        return 1e9 * width  # depends on the width, so a plain mean would differ

    f = model_flops(_steps(), warmup=1, rows=4, per_position=per_position)
    assert seen == [(20.0, 0.25), (40.0, 0.375)]
    total = 20e9 * 80 + 40e9 * 160
    assert f["model_flops_per_pos"] == pytest.approx(total / 240)
    assert f["achieved_gflop_s"] == pytest.approx(total / 4.0 / 1e9)


def _result(with_rate: bool, precision="fp32"):
    steps = _steps()
    variants = {}
    for name in ("mlxtune-torch", "mlxtune-mlx"):
        v = {**summarize(steps, 1), "steps": steps, "peak_framework": 2**30, "peak_rss_wait4": 2**30}
        if with_rate:
            v.update(model_flops(steps, 1, 4, lambda w, s: 5e8))
        variants[name] = v
    result = {"date": "2026-12-03", "machine": {"cpu": "test", "cpus": 2, "platform": "linux"},
              "job": {"train_examples": 9, "eval_examples": 1, "rank": 16, "alpha": 32, "target_modules": ["q_proj"],
                      "layers": [0, 1], "micro_batch": 4},
              "warmup_steps": 1, "timed_steps": 2, "precision_torch": precision, "variants": variants, "ratios": {}}
    if with_rate:
        result["matmul_rate"] = {"rows": 60, "torch_fp32": 100.0, "torch_bf16": 200.0, "mlx_fp32": 50.0}
    return result


def test_table_has_flops_columns_and_mfu_per_framework_and_precision():
    r = _result(True)
    achieved = 5e8 * 240 / 4.0 / 1e9  # 30 GFLOP/s
    assert r["variants"]["mlxtune-torch"]["achieved_gflop_s"] == pytest.approx(achieved)
    assert mfu_of("mlxtune-torch", r) == pytest.approx(achieved / 100.0)
    assert mfu_of("mlxtune-mlx", r) == pytest.approx(achieved / 50.0)
    assert mfu_of("mlxtune-torch", _result(True, "bf16")) == pytest.approx(achieved / 200.0)
    table = markdown(r)
    assert "| model GFLOP / processed position | achieved GFLOP/s | MFU |" in table
    assert "| 0.5 | 30.0 | 30.0% |" in table and "| 0.5 | 30.0 | 60.0% |" in table
    assert "torch fp32 100.0, torch bf16 200.0, mlx fp32 50.0" in table
    header, rule = [ln for ln in table.splitlines() if ln.startswith("| variant") or ln.startswith("|---|")][:2]
    row = next(ln for ln in table.splitlines() if ln.startswith("| mlxtune-torch"))
    assert header.count("|") == rule.count("|") == row.count("|")


def test_old_results_without_flops_still_summarize():
    r = _result(False)
    assert mfu_of("mlxtune-torch", r) is None
    table = markdown(r)
    assert "| n/a | n/a | n/a |" in table and "Matmul rate: n/a" in table


def test_matmul_rate_on_the_tiny_shapes(tmp_path):
    """Every framework here in its own process, as the harness runs it; positive, finite rates."""
    from bench.train_bench import child_env, has_module

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CFG))
    shapes = matmul_rate.model_shapes(TINY_CFG, 32)
    assert [s[0] for s in shapes][-1] == "head" and shapes[0] == ("q_proj", 32, 64, 64, 2)
    assert matmul_rate.aggregate({s[0]: 1.0 for s in shapes}, shapes) == pytest.approx(
        sum(2 * m * k * n * u for _, m, k, n, u in shapes) / sum(u for *_, u in shapes) / 1e9)
    frameworks = ("torch", "mlx") if has_module("mlx") else ("torch",)
    rate = matmul_rate.measure(cfg, 32, tmp_path, child_env, frameworks + ("nope",))
    keys = {"torch_fp32", "torch_bf16"} | ({"mlx_fp32"} if "mlx" in frameworks else set())
    assert keys <= set(rate) and all(0 < rate[k] < 1e7 for k in keys), rate
    assert set(rate["errors"]) == {"nope"}
