"""The README's main job: the quickstart recipe on the embedded SmolLM2-135M, on CPU, on both
backends, and `mlxtune compare` on the two runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
RECIPE = ROOT / "recipes" / "quickstart.toml"


def run_quickstart(out_dir: Path, backend: str) -> subprocess.CompletedProcess:
    # A fresh process as a user starts it: the mlxtune command decides about OpenBLAS itself
    # (MLX gets OpenBLAS, ~20x faster than its bundled BLAS; torch keeps its own).
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLXTUNE_OPENBLAS_REEXEC", "OMP_WAIT_POLICY")}
    cmd = [sys.executable, "-m", "mlxtune", "run", str(RECIPE), "--backend", backend, "--no-progress",
           "--set", f"output.dir={json.dumps(str(out_dir))}", "--set", f'output.name="{backend}"']
    out = subprocess.run(cmd, env=env | {"COLUMNS": "120"}, cwd=out_dir, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, embedded_model_dir):
    out = tmp_path_factory.mktemp("quickstart")
    return out, {b: run_quickstart(out, b) for b in ("torch", "mlx")}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_quickstart_learns_and_reports(runs, backend):
    out_dir, procs = runs
    run = out_dir / backend
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    base = next(e for e in events if e["event"] == "eval" and not e["adapter"])
    final = [e for e in events if e["event"] == "eval" and e["adapter"]][-1]
    train = [e for e in events if e["event"] == "train"]
    assert len(train) == 23  # ceil(2 epochs * 23 micro batches / 2)
    # the task is learnable: clear drops on both masks, as in the users' reports
    assert final["loss"] < 0.8 * base["loss"], (base, final)
    assert final["loss_full"] < base["loss_full"]
    report = (run / "report.md").read_text()
    assert "| eval loss (response only) |" in report and "| perplexity (full text) |" in report
    assert "base vs fine-tuned" in procs[backend].stdout
    # it ends with one eval example, base model and fine-tuned side by side (eval.show_examples = 1)
    example = json.loads((run / "generations" / "examples.jsonl").read_text())
    assert "eval example 1, prompt:" in procs[backend].stdout and example["base"] != example["tuned"]
    print(f"\nquickstart {backend} example: {example['prompt']!r}\n  base:  {example['base'][:300]!r}\n  tuned: {example['tuned'][:300]!r}")
    end = events[-1]
    print(f"\nquickstart {backend}: base {base['loss']:.4f} -> {final['loss']:.4f} (response), "
          f"{base['loss_full']:.4f} -> {final['loss_full']:.4f} (full); {end['train_seconds']:.0f} s training, "
          f"{end['trained_tokens_per_s']:.1f} trained tokens/s, peak {end['peak_memory'] / 2**30:.2f} GiB")


@pytest.mark.slow
def test_quickstart_backends_agree(runs):
    from mlxtune.runs.compare import compare_runs

    out_dir, _ = runs
    result = compare_runs(out_dir / "torch", out_dir / "mlx")
    print("\nquickstart torch vs mlx:", {k: v for k, v in result.items() if not isinstance(v, (list, dict))})
    cmd = [sys.executable, "-m", "mlxtune", "compare", str(out_dir / "torch"), str(out_dir / "mlx"), "--tol", "2e-3"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0 and "AGREE" in out.stdout, out.stdout[-3000:]
