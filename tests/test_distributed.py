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


# ---------------------------------------------------------------- the planner: one device of N


SMOLLM2 = json.loads((Path(__file__).parents[1] / "mlxtune/model_configs/smollm2-135m-instruct.json").read_text())
AUTO = """
[model]
path = "HuggingFaceTB/SmolLM2-135M-Instruct"
dtype = "float32"
[data]
train = "train.jsonl"
format = "alpaca"
max_seq_len = 512
[train]
micro_batch = "auto"
effective_batch = 16
memory_budget = "3GB"
"""


def test_plan_is_one_devices_and_keeps_the_global_batch(tmp_path):
    from mlxtune.planning.memory import StepSetup
    from mlxtune.planning.planner import make_plan, plan_recipe, resolve_auto
    from mlxtune.recipe.loading import load_recipe

    (tmp_path / "r.toml").write_text(AUTO)
    r = load_recipe(tmp_path / "r.toml", planning=True)
    one, two = (plan_recipe(r, "torch", config=SMOLLM2, world_size=n, launcher="torchrun") for n in (1, 2))
    assert (one.effective_batch, one.global_batch) == (16, 16) and (two.effective_batch, two.global_batch) == (16 // 2, 16)
    assert two.micro_batch * two.grad_accum == 8 and two.fits
    # each device holds the whole base and its micro batch: its plan is one process's plan of 8 examples a step
    alone = make_plan(SMOLLM2, StepSetup.from_recipe(r, "torch", two.device), two.budget, 8, 512, checkpointing="auto")
    assert (alone.micro_batch, alone.grad_accum, alone.estimate.total) == (two.micro_batch, two.grad_accum, two.estimate.total)
    assert two.estimate.weights == one.estimate.weights  # not divided by the world size (no FSDP)
    line = two.describe()
    assert line.startswith(f"world size 2 (torchrun): per device: micro_batch {two.micro_batch} x grad_accum {two.grad_accum}")
    assert line.endswith(f"global batch = {two.micro_batch} x {two.grad_accum} x 2 = 16 examples per step")
    assert "world size" not in one.describe()
    resolved, _ = resolve_auto(r, "torch", SMOLLM2, [100] * 20, world_size=4)
    assert resolved.train.micro_batch * resolved.train.grad_accum * 4 == 16
    with pytest.raises(MlxtuneError, match=r"train.effective_batch: 16 examples per step cannot be split evenly across 3 processes"):
        plan_recipe(r, "torch", config=SMOLLM2, world_size=3)
    # a micro batch as written is rows per process: the global batch grows with the world
    fixed = load_recipe(tmp_path / "r.toml", ["train.micro_batch=2", "train.grad_accum=2", "train.effective_batch=0"], planning=True)
    three = plan_recipe(fixed, "torch", config=SMOLLM2, world_size=3)
    assert (three.effective_batch, three.global_batch) == (4, 12)


def test_mlx_launch_ring_size_comes_from_its_hostfile(tmp_path):
    hosts = tmp_path / "hosts.json"
    hosts.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]\n')  # what mlx.launch -n 2 --backend ring writes
    assert detect_launch({"MLX_RANK": "1", "MLX_HOSTFILE": str(hosts)}) == Launch("mlx.launch", 1, 2, 0)
    hosts.write_text("\n")  # -n 1: an empty hostfile
    assert detect_launch({"MLX_RANK": "0", "MLX_HOSTFILE": str(hosts)}).size is None
    assert detect_launch({"MLX_RANK": "0", "MLX_WORLD_SIZE": "3", "MLX_HOSTFILE": str(hosts)}).size == 3


def test_a_run_under_a_launcher_plans_each_device_for_the_global_batch(tiny_recipe, monkeypatch):
    from mlxtune.recipe.loading import load_recipe
    from mlxtune.training.session import plan_batches, prepare

    r = load_recipe(tiny_recipe(), ["train.micro_batch=auto", "train.grad_accum=1", "train.effective_batch=8",
                                    "train.memory_budget=2GB"])
    model_dir, _, data = prepare(r)
    notes: list[str] = []
    ui = type("UI", (), {"message": lambda self, text: notes.append(text)})()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    resolved = plan_batches(r, "torch", model_dir, data, ui)
    assert resolved.train.micro_batch * resolved.train.grad_accum == 4
    assert notes[0].startswith("memory plan: world size 2 (torchrun): per device: micro_batch") and "x 2 = 8 examples per step" in notes[0]
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(MlxtuneError, match="cannot be split evenly across 3 processes"):
        plan_batches(r, "torch", model_dir, data, ui)


def test_shard_base_plans_a_share_of_the_blocks_per_device(tmp_path):
    from mlxtune.planning.memory import planner_shape
    from mlxtune.planning.planner import plan_recipe
    from mlxtune.recipe.loading import load_recipe

    (tmp_path / "r.toml").write_text(AUTO)
    r = load_recipe(tmp_path / "r.toml", ["train.shard_base=true"], planning=True)
    p = planner_shape(SMOLLM2).parameters()
    blocks = p["projections"] + p["other"]
    whole, four = (plan_recipe(r, "torch", config=SMOLLM2, world_size=n, launcher="torchrun") for n in (1, 4))
    assert whole.estimate.weights == 4 * sum(p.values()) and whole.base_shards == 1
    # 1/4 of the blocks, the two gathered at a time (running, prefetched), embedding and head whole
    assert four.estimate.weights == 4 * (p["embedding"] + p["head"] + -(-blocks // 4) + 2 * blocks // 30)
    assert four.base_shards == 4 and "per device (base blocks sharded 4 ways: train.shard_base)" in four.describe()
    mlx = plan_recipe(r, "mlx", config=SMOLLM2, world_size=4)  # the MLX backend does not shard (refused at run time)
    assert mlx.estimate.weights == whole.estimate.weights and mlx.base_shards == 1


def test_plan_command_takes_the_world_size_from_the_option_or_the_launcher(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlxtune.cli.main import cli

    (tmp_path / "r.toml").write_text(AUTO)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MLX_RANK", "MLX_WORLD_SIZE", "MLX_HOSTFILE"):
        monkeypatch.delenv(key, raising=False)
    plan = ["plan", str(tmp_path / "r.toml"), "--backend", "torch", "--config", str(Path(__file__).parents[1] / "mlxtune/model_configs/smollm2-135m-instruct.json")]
    single = CliRunner().invoke(cli, plan)
    assert single.exit_code == 0 and "world size" not in single.output and "(effective batch 16)" in single.output, single.output
    given = CliRunner().invoke(cli, plan + ["--world-size", "2"])
    text = " ".join(given.output.split())
    assert given.exit_code == 0 and "world size 2 (--world-size): per device: micro_batch =" in text, given.output
    assert "(effective batch 8 per device)" in text and "x 2 = 16" in text and "one of 2" in text
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    launched = " ".join(CliRunner().invoke(cli, plan).output.split())
    assert "world size 4 (torchrun): per device:" in launched and "x 4 = 16" in launched
    assert "world size 2 (--world-size)" in " ".join(CliRunner().invoke(cli, plan + ["--world-size", "2"]).output.split())
    odd = CliRunner().invoke(cli, plan + ["--world-size", "3"])
    assert odd.exit_code == 2 and "cannot be split evenly across 3 processes" in odd.output


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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two 2-process runs: about 2 minutes on 2 CPU cores
@pytest.mark.skipif(shutil.which("accelerate") is None, reason="accelerate is not installed")
def test_accelerate_launch_two_processes_match_torchrun(tmp_path, tiny_model_dir):
    """``accelerate launch`` starts torch's elastic agent (as torchrun) and sets the same
    variables; its ``--cpu`` flag alone runs ONE process whatever --num_processes says, so on a
    machine without GPUs it is ``--multi_gpu`` (gloo on CPU). HF_HOME isolates it from any
    ``accelerate config`` file (no prompt either way)."""
    recipe = write_recipe(tmp_path, tiny_model_dir)
    accelerate = [shutil.which("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m"]
    acc = subprocess.run(accelerate + mlxtune(recipe, "--backend", "torch", "--set", "output.name=acc")[1:], cwd=tmp_path,
                         env=env() | {"HF_HOME": str(tmp_path / "hf")}, capture_output=True, text=True, timeout=300)
    assert acc.returncode == 0, acc.stdout[-3000:] + acc.stderr[-3000:]
    assert "data parallel: torchrun, 2 processes" in acc.stderr + acc.stdout
    check(TORCHRUN + mlxtune(recipe, "--backend", "torch"), tmp_path)
    a, b = losses(tmp_path / "runs/acc"), losses(tmp_path / "runs/two")
    loss_diff = max(abs(x - y) for x, y in zip(a, b))
    weight_diff = max_diff(adapter(tmp_path / "runs/acc"), adapter(tmp_path / "runs/two"))
    print(f"torch, accelerate launch vs torchrun (2 processes each): per-step loss max |diff| {loss_diff:.3g}, adapter max |diff| {weight_diff:.3g}")
    assert len(a) == len(b) == 5 and loss_diff <= 1e-6 and weight_diff <= 1e-6


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
    loss_diff = max(abs(x - y) for x, y in zip(a, b))
    weight_diff = max_diff(adapter(tmp_path / "runs/two"), adapter(tmp_path / "runs/one"))
    print(f"mlx, 2 processes vs 1: per-step loss max |diff| {loss_diff:.3g}, adapter max |diff| {weight_diff:.3g}")
    assert len(a) == len(b) == 5
    # absolute: the rows' NLLs are added in float64 on the host, not per pass in float32 (mlx_loss._loss)
    assert loss_diff <= 1e-6 and weight_diff <= 1e-6


def _mlx_rank_pid(rank: int, recipe: Path) -> int:
    """The pid of mlx.launch's rank ``rank`` running ``recipe`` (its environment says MLX_RANK)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in environ and str(recipe).encode() in cmdline:
            return int(proc.name)
    raise AssertionError(f"no process of rank {rank} runs {recipe}")


def _kill_a_rank_after_checkpoint(cmd: list[str], cwd: Path, run: Path, pid_of=None) -> int:
    """Start the launcher and SIGKILL rank 0 (the pid in the run's lock file; ``pid_of()``: another
    rank's) as soon as the first checkpoint is in place; the launcher then stops the other rank and
    exits. Returns the launcher's exit code."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list((run / "checkpoints").glob("step-*/state.json")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before the kill"
        os.kill(pid_of() if pid_of else int((run.parent / f".{run.name}.lock").read_text().split()[0]), signal.SIGKILL)
        return proc.wait(timeout=120)  # (mlx.launch exits 0 even then)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_torchrun_killed_run_resumes_to_the_same_result_and_refuses_another_world_size(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, steps=14, save_every=2)
    _kill_a_rank_after_checkpoint(TORCHRUN + mlxtune(recipe, "--backend", "torch"), tmp_path, tmp_path / "runs/two")
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
def test_mlx_launch_run_whose_rank_1_is_killed_resumes_to_the_same_result(tmp_path, tiny_model_dir):
    """Rank 1 (which writes nothing) SIGKILLed after the first checkpoint: the checkpoint stays
    intact and resumes exactly (torch's test kills rank 0, the writer). mlx.launch only warns when
    a rank fails and exits 0 (mlx 0.32; README says so), so the run directory tells: no ``end``
    event, no adapters/."""
    recipe = write_recipe(tmp_path, tiny_model_dir, steps=8, save_every=2)
    launch = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--", sys.executable]
    run = tmp_path / "runs/two"
    rc = _kill_a_rank_after_checkpoint(launch + mlxtune(recipe, "--backend", "mlx"), tmp_path, run,
                                      pid_of=lambda: _mlx_rank_pid(1, recipe))
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    print(f"mlx.launch exit code after rank 1 was SIGKILLed: {rc}")
    assert "end" not in events and not (run / "adapters").exists()
    check(launch + mlxtune(recipe, "--backend", "mlx", "--resume"), tmp_path)
    check(launch + mlxtune(recipe, "--backend", "mlx", "--set", "output.name=ref"), tmp_path)
    assert len([e for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["event"] == "resume"]) == 1
    assert losses(run) == pytest.approx(losses(tmp_path / "runs/ref"), abs=1e-12)
    diff = max_diff(adapter(run), adapter(tmp_path / "runs/ref"))
    print(f"mlx, rank 1 killed after a checkpoint and resumed vs uninterrupted: adapter max |diff| {diff:.3g}")
    assert diff <= 1e-6
