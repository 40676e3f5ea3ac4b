"""Data-parallel training (issue 16): the launchers' processes compute what one process computes.

The 2-process tests run the real launchers as a user would (``torchrun --standalone
--nproc-per-node 2 -m mlxtune run R``; ``mlx.launch -n 2 --backend ring -- python -m mlxtune run R
--backend mlx``) against one process with twice the micro batch: 5 steps, grad_accum 2, gradient
clipping on, dropout 0, fp32. ``pytest -rP`` prints the differences measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_RECIPE_HEAD, TINY_RECORDS, write_jsonl
from mlxtune.data.batching import Batch
from mlxtune.errors import MlxtuneError
from mlxtune.training.dist import Dist, Launch, check_launch, detect_launch, shard

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
MLX_LAUNCH = shutil.which("mlx.launch")


def write_recipe(tmp_path: Path, model_dir: Path, steps: int = 5, save_every: int = 2) -> Path:
    write_jsonl(tmp_path / "train.jsonl", TINY_RECORDS * 4)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TINY_RECIPE_HEAD.format(model=model_dir).replace("alpha = 8", "alpha = 8\ndropout = 0.0") + f'''
[train]
steps = {steps}
lr = 1e-3
warmup_steps = 2
micro_batch = 2
grad_accum = 2
grad_clip = 0.5
save_every = {save_every}
eval_every = 0

[eval]
before = false

[output]
dir = "{tmp_path / 'runs'}"
name = "two"
''')
    return recipe


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def mlxtune(recipe: Path, *args: str) -> list[str]:
    return ["-m", "mlxtune", "run", str(recipe), "--no-progress", *args]


def check(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(run: Path) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "train"]


def adapter(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    f = run / "adapters" / "adapter_model.safetensors"
    return load_file(f if f.is_file() else run / "adapters" / "adapters.safetensors")


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# ---------------------------------------------------------------- the core, in process


def test_detect_launch_reads_the_launchers_environment():
    assert detect_launch({}) == Launch()
    assert detect_launch({"WORLD_SIZE": "1", "RANK": "0"}) == Launch()
    assert detect_launch({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == Launch("torchrun", 3, 4, 1)
    assert detect_launch({"MLX_RANK": "1"}) == Launch("mlx.launch", 1, None, 0)
    with pytest.raises(MlxtuneError, match="WORLD_SIZE"):
        detect_launch({"WORLD_SIZE": "two"})


def test_a_backend_that_cannot_use_the_launcher_is_refused():
    check_launch(Launch(), "torch")
    check_launch(Launch("torchrun", 0, 2), "torch")
    with pytest.raises(MlxtuneError, match=r"only the mlx backend.*-- python -m mlxtune run R --backend mlx"):
        check_launch(Launch("mlx.launch", 0, None), "torch")
    with pytest.raises(MlxtuneError, match="only the torch backend"):
        check_launch(Launch("torchrun", 1, 2), "mlx")


def test_shard_takes_each_ranks_rows_and_pads_a_short_batch():
    tokens = np.arange(12, dtype=np.int32).reshape(3, 4)
    mask = np.ones((3, 4), dtype=bool)
    batch = Batch(tokens, mask, mask.copy(), epoch=1)
    parts = [shard(batch, Dist(r, 2), 2) for r in range(2)]
    assert parts[0].tokens.tolist() == tokens[:2].tolist() and parts[1].tokens.tolist() == tokens[2:].tolist()
    assert sum(p.n_targets for p in parts) == batch.n_targets
    empty = shard(batch, Dist(2, 3), 2)  # rank 2 of 3: rows 4-5 do not exist
    assert len(empty.tokens) == 1 and empty.n_targets == 0 and not empty.full_mask.any()
    assert shard(batch, Dist(), 2) is batch


# ---------------------------------------------------------------- the launchers, as a user runs them


def test_torchrun_two_processes_match_one_with_twice_the_micro_batch(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    two = check(TORCHRUN + mlxtune(recipe, "--backend", "torch"), tmp_path)
    assert "data parallel: torchrun, 2 processes" in two.stderr + two.stdout
    check([sys.executable] + mlxtune(recipe, "--backend", "torch", "--set", "train.micro_batch=4", "--set", "output.name=one"), tmp_path)
    a, b = losses(tmp_path / "runs/two"), losses(tmp_path / "runs/one")
    loss_diff = max(abs(x - y) for x, y in zip(a, b))
    weight_diff = max_diff(adapter(tmp_path / "runs/two"), adapter(tmp_path / "runs/one"))
    print(f"torch, 2 processes vs 1: per-step loss max |diff| {loss_diff:.3g}, adapter max |diff| {weight_diff:.3g}")
    assert len(a) == len(b) == 5
    assert loss_diff <= 1e-6 and weight_diff <= 1e-6
    state = json.loads(next((tmp_path / "runs/two/checkpoints").glob("step-*/state.json")).read_text())
    assert state["world_size"] == 2


@pytest.mark.skipif(MLX_LAUNCH is None, reason="mlx.launch is not installed")
def test_mlx_launch_two_processes_match_one_with_twice_the_micro_batch(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    launch = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable]
    # without --backend mlx the run's backend is torch, which cannot use mlx.launch's processes
    refused = subprocess.run(launch + mlxtune(recipe, "--set", "output.name=wrong"), cwd=tmp_path, env=env(),
                             capture_output=True, text=True, timeout=120)
    # (mlx.launch itself exits 0 when its ranks fail: it only warns)
    assert "only the mlx backend can use" in refused.stdout + refused.stderr
    assert not (tmp_path / "runs/wrong/metrics.jsonl").exists()
    check(launch + mlxtune(recipe, "--backend", "mlx"), tmp_path)
    check([sys.executable] + mlxtune(recipe, "--backend", "mlx", "--set", "train.micro_batch=4", "--set", "output.name=one"), tmp_path)
    a, b = losses(tmp_path / "runs/two"), losses(tmp_path / "runs/one")
    loss_diff = max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))
    weight_diff = max_diff(adapter(tmp_path / "runs/two"), adapter(tmp_path / "runs/one"))
    print(f"mlx, 2 processes vs 1: per-step loss max relative diff {loss_diff:.3g}, adapter max |diff| {weight_diff:.3g}")
    assert len(a) == len(b) == 5
    # MLX sums each pass's NLL in float32: at a loss of 4.7 one float32 step is 4.8e-7, so the
    # per-step loss is compared relative to its size
    assert loss_diff <= 1e-6 and weight_diff <= 1e-6


def _kill_rank0_after_checkpoint(cmd: list[str], cwd: Path, run: Path) -> None:
    """Start the launcher and SIGKILL rank 0 (the pid in the run's lock file) as soon as the
    first checkpoint is in place; the launcher then stops the other rank and exits."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list((run / "checkpoints").glob("step-*/state.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before the kill"
        os.kill(int((run.parent / f".{run.name}.lock").read_text().split()[0]), signal.SIGKILL)
        proc.wait(timeout=120)  # (mlx.launch exits 0 even then)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_torchrun_killed_run_resumes_to_the_same_result_and_refuses_another_world_size(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, steps=14, save_every=2)
    _kill_rank0_after_checkpoint(TORCHRUN + mlxtune(recipe, "--backend", "torch"), tmp_path, tmp_path / "runs/two")
    assert not (tmp_path / "runs/two/adapters").exists()
    one = subprocess.run([sys.executable] + mlxtune(recipe, "--backend", "torch", "--resume"), cwd=tmp_path, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 2 and "written by a run of 2 process(es) and this one has 1" in one.stderr, one.stderr[-2000:]
    check(TORCHRUN + mlxtune(recipe, "--backend", "torch", "--resume"), tmp_path)
    events = [json.loads(line) for line in (tmp_path / "runs/two/metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "resume"] == [2]
    check(TORCHRUN + mlxtune(recipe, "--backend", "torch", "--set", "output.name=ref"), tmp_path)
    assert losses(tmp_path / "runs/two") == pytest.approx(losses(tmp_path / "runs/ref"), abs=1e-12)
    diff = max_diff(adapter(tmp_path / "runs/two"), adapter(tmp_path / "runs/ref"))
    print(f"torch, 2 processes killed after a checkpoint and resumed vs uninterrupted: adapter max |diff| {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.skipif(MLX_LAUNCH is None, reason="mlx.launch is not installed")
def test_mlx_launch_killed_run_resumes_to_the_same_result(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, steps=8, save_every=2)
    launch = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable]
    _kill_rank0_after_checkpoint(launch + mlxtune(recipe, "--backend", "mlx"), tmp_path, tmp_path / "runs/two")
    assert not (tmp_path / "runs/two/adapters").exists()
    check(launch + mlxtune(recipe, "--backend", "mlx", "--resume"), tmp_path)
    check(launch + mlxtune(recipe, "--backend", "mlx", "--set", "output.name=ref"), tmp_path)
    events = [json.loads(line) for line in (tmp_path / "runs/two/metrics.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["event"] == "resume"]) == 1
    assert losses(tmp_path / "runs/two") == pytest.approx(losses(tmp_path / "runs/ref"), abs=1e-12)
    diff = max_diff(adapter(tmp_path / "runs/two"), adapter(tmp_path / "runs/ref"))
    print(f"mlx, 2 processes killed after a checkpoint and resumed vs uninterrupted: adapter max |diff| {diff:.3g}")
    assert diff <= 1e-6
