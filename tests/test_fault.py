"""Fault injection (issue 17): ``kill -9`` at random moments of ``mlxtune run`` with dropout, in
training steps, in evals and inside checkpoint and ``best/`` writes, then ``--resume`` until the run
finishes. After every kill each checkpoint the run directory lists must load; at the end the final
adapter and ``best/`` must equal those of an uninterrupted run: bit-exact on torch (CPU), within
1e-6 on MLX. ``pytest -rP tests/test_fault.py`` prints the numbers (kills, where they landed,
resumes, corrupt checkpoints, max |adapter difference|).

Kills are timed from what the run directory shows (metrics.jsonl events, the ``.step-N.tmp`` /
``.best.tmp`` folders of a write in progress), polled every ~0.2 ms, plus a seeded random delay,
because the tiny model's whole training takes under a second after ~7 s of imports.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import crash_train_step
from mlxtune.recipe.loading import load_recipe
from mlxtune.runs.rundir import RunDir, read_state

STEPS, EVAL_EVERY = 12, 2
SETS = ["adapter.dropout=0.1", "train.save_every=1", f"train.eval_every={EVAL_EVERY}", f"train.steps={STEPS}"]
TOLERANCE = {"torch": 0.0, "mlx": 1e-6}  # max |final adapter difference| against the uninterrupted run
CLASSES = {"torch": ("backends.torch_peft", "TorchBackend"), "mlx": ("backends.apple_mlx", "MLXBackend")}
SEED = 17


def _backend_class(name: str) -> type:
    return getattr(pytest.importorskip(CLASSES[name][0]), CLASSES[name][1])


def _sets(name: str) -> list[str]:
    return [*SETS, f"output.name={name}"]


def _tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no tensors in {folder}"
    return out


def max_diff(a: Path, b: Path) -> float:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    return max(float(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64)).max()) for k in ta)


# ---------------------------------------------------------------- in-process: the dropout stream


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_resume_with_dropout_is_exact(tiny_recipe, monkeypatch, backend):
    """A run cut inside step 5 (after its step-4 checkpoint) and resumed ends with the
    uninterrupted run's adapter: the dropout masks continue where they stopped (MLX drifted by
    ~1e-2 while its random stream restarted from the seed)."""
    from mlxtune.training.session import run

    cls = _backend_class(backend)
    path = tiny_recipe()
    full, _ = run(load_recipe(path, _sets("full")), backend)
    original = crash_train_step(monkeypatch, cls, 9)  # 2 passes a step: the second pass of step 5
    with pytest.raises(RuntimeError, match="simulated"):
        run(load_recipe(path, _sets("cut")), backend)
    monkeypatch.setattr(cls, "train_step", original)
    cut, _ = run(load_recipe(path, _sets("cut")), backend, resume=True)
    diff = max_diff(full.path / "adapters", cut.path / "adapters")
    print(f"{backend}: cut at step 5 and resumed, dropout 0.1: max |adapter difference| = {diff:.3g}")
    assert diff <= TOLERANCE[backend]


# ---------------------------------------------------------------- kill -9 in subprocesses


def _events(run: Path) -> list[dict]:
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written
    return out


def _last_train_step(run: Path) -> int:
    return max((e["step"] for e in _events(run) if e.get("event") == "train"), default=0)


def _writes(run: Path) -> list[str]:
    """Weight folders being written or replaced now (``.step-N.tmp``, ``.best.tmp``, ``.x.old``)."""
    out = []
    for folder in (run, run / "checkpoints"):
        try:
            out += [n for n in os.listdir(folder) if n.startswith(".") and n.endswith((".tmp", ".old"))]
        except OSError:
            pass
    return out


def _trigger(kind: str, run: Path, after: int):
    """A function that says when to kill: True once the run shows ``kind`` past step ``after``."""
    if kind == "train":
        return lambda: _last_train_step(run) > after
    if kind == "eval":  # an eval starts right after the train event of a step divisible by eval_every
        return lambda: (s := _last_train_step(run)) > after and s % EVAL_EVERY == 0
    if kind == "best":
        return lambda: _last_train_step(run) > after and any(w.startswith(".best.") for w in _writes(run))
    return lambda: _last_train_step(run) > after and any(w.startswith(".step-") for w in _writes(run))


def _landed(run: Path) -> str:
    """Where a kill landed, from what the run directory shows afterwards."""
    writes = _writes(run)
    if writes:
        return "inside a write of " + ("best/" if any(".best." in w for w in writes) else
                                       "adapters/" if any(".adapters." in w for w in writes) else "a checkpoint")
    events = _events(run)
    last = events[-1] if events else {}
    if last.get("event") == "train" and last["step"] % EVAL_EVERY == 0:
        return "in an eval"
    if last.get("event") == "end" or (run / "adapters").is_dir():
        return "after training"
    return "in training" if last.get("event") in ("train", "eval") else "before training"


class Loader:
    """Loads a checkpoint the way --resume does, with a backend of the run's recipe."""

    def __init__(self, backend: str, model_dir: Path, recipe):
        from mlxtune.training.session import load_backend_with_adapter

        self.backend = load_backend_with_adapter(backend, model_dir, recipe)
        self.backend.setup_optimizer(recipe)

    def problems(self, run: Path) -> list[str]:
        """Every listed checkpoint, best/ and adapters/ that do not load, with the error."""
        out = []
        folders = [(p, True) for _, p in RunDir(run).checkpoints()]
        folders += [(run / "best", False)] if (run / "best").exists() else []
        for p, optimizer in folders:
            try:
                self.backend.load_adapter(p / "adapter")
                if optimizer:
                    self.backend.load_optimizer(p / "optimizer.safetensors")
                read_state(p)
            except Exception as e:  # any failure to load is what this test counts
                out.append(f"{p.relative_to(run)}: {type(e).__name__}: {e}")
        if (run / "adapters").exists():
            try:
                self.backend.load_adapter(run / "adapters")
            except Exception as e:
                out.append(f"adapters: {type(e).__name__}: {e}")
        return out


def _command(backend: str, recipe: Path, name: str, *flags: str) -> list[str]:
    sets = [x for s in _sets(name) for x in ("--set", s)]
    return [sys.executable, "-m", "mlxtune", "run", str(recipe), "--backend", backend, "--no-progress", *sets, *flags]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)


def _kill_when(proc: subprocess.Popen, ready, delay: float, limit: float = 120.0) -> bool:
    """SIGKILL ``proc`` ``delay`` s after ``ready()`` turns True; False when it ended by itself first."""
    end = time.monotonic() + limit
    while proc.poll() is None:
        if ready():
            time.sleep(delay)
            if proc.poll() is not None:
                return False
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("the run neither finished nor reached the kill point")
        time.sleep(0.0002)
    return False


def kill_and_resume(backend: str, recipe: Path, model_dir: Path, kills: int, kinds: list[str]) -> dict:
    """Run the recipe in a subprocess, kill it ``kills`` times at the points ``kinds`` name (in
    turn, shuffled), restarting with --resume each time (or --overwrite while no checkpoint
    exists), then resume until it finishes. Returns the counts."""
    rng = random.Random(f"{SEED}-{backend}-{kills}")
    name = f"killed-{kills}"
    run = Path(load_recipe(recipe, _sets(name)).output.dir) / name
    loader = Loader(backend, model_dir, load_recipe(recipe, _sets(name)))
    log = recipe.parent / f"{name}.log"
    plan = [kinds[i % len(kinds)] for i in range(kills)]
    rng.shuffle(plan)
    counts = {"kills": 0, "resumes": 0, "restarts": 0, "corrupt": 0, "landed": Counter(), "problems": []}
    flags: tuple[str, ...] = ()
    for kind in [*plan, None]:
        proc = _start(_command(backend, recipe, name, *flags), log)
        if kind is None:  # the last resume runs to the end
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            break
        after = max(0, (RunDir(run).checkpoints() or [(0, None)])[-1][0]) + rng.randint(0, 2)
        delay = rng.uniform(0, 0.03 if kind == "train" else 0.002)
        if not _kill_when(proc, _trigger(kind, run, min(after, STEPS - 2)), delay):
            assert proc.returncode == 0, log.read_text()[-3000:]
            break  # finished before the kill point
        counts["kills"] += 1
        counts["landed"][_landed(run)] += 1
        problems = loader.problems(run)
        counts["corrupt"] += len(problems)
        counts["problems"] += problems
        if RunDir(run).checkpoints():
            flags, counts["resumes"] = ("--resume",), counts["resumes"] + 1
        else:
            flags, counts["restarts"] = ("--overwrite",), counts["restarts"] + 1
    counts["corrupt"] += len(loader.problems(run))
    return counts


@pytest.mark.parametrize("backend,kills", [
    ("torch", 2), ("mlx", 2),  # ~30 s each on 2 cores (a process start is ~7 s of imports)
    pytest.param("torch", 8, marks=pytest.mark.slow), pytest.param("mlx", 8, marks=pytest.mark.slow),
])
def test_kill_9_and_resume(tiny_recipe, tiny_model_dir, backend, kills):
    from mlxtune.training.session import run

    _backend_class(backend)
    recipe = tiny_recipe()
    full, _ = run(load_recipe(recipe, _sets("full")), backend)  # the uninterrupted run, in this process
    kinds = ["checkpoint", "eval", "train", "best"] if kills > 2 else ["checkpoint", "best"]
    c = kill_and_resume(backend, recipe, tiny_model_dir, kills, kinds)
    killed = Path(full.path).parent / f"killed-{kills}"
    final = max_diff(full.path / "adapters", killed / "adapters")
    best = max_diff(full.path / "best" / "adapter", killed / "best" / "adapter")
    print(f"{backend}: {c['kills']} kills ({', '.join(f'{n} {w}' for w, n in sorted(c['landed'].items()))}), "
          f"{c['resumes']} resumes, {c['restarts']} restarts, {c['corrupt']} corrupt checkpoints; "
          f"max |adapter difference| vs the uninterrupted run: final {final:.3g}, best/ {best:.3g}")
    assert c["corrupt"] == 0, c["problems"]
    assert c["kills"] >= 1
    assert read_state(killed / "best")["step"] == read_state(full.path / "best")["step"]
    # metrics.jsonl: every step logged once, with the uninterrupted run's loss (resume drops replayed events)
    losses = [{e["step"]: e["loss"] for e in _events(r) if e.get("event") == "train"} for r in (full.path, killed)]
    assert [e["step"] for e in _events(killed) if e.get("event") == "train"] == list(range(1, STEPS + 1))
    assert max(abs(losses[0][k] - losses[1][k]) for k in losses[0]) <= TOLERANCE[backend]
    assert final <= TOLERANCE[backend] and best <= TOLERANCE[backend]
