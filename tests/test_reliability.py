"""Reliability: the run-directory lock, the non-finite guard, a full disk while saving, and the
recovery of a weight folder that a kill left moved aside."""

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ragged_batches
from mlxtune.errors import MlxtuneError
from mlxtune.files import is_disk_full
from mlxtune.recipe.loading import load_recipe
from mlxtune.runs.rundir import METRICS, RunDir, locked_if_run, run_lock

BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("mlx") is None, reason="mlx not installed"))]

HOLD = """
import sys, time
from mlxtune.runs.rundir import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(path):
    """A separate process holding the lock of run directory ``path`` (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _events(run_path, kind):
    return [json.loads(line) for line in (run_path / METRICS).read_text().splitlines() if json.loads(line)["event"] == kind]


# ---------------------------------------------------------------- the lock

def test_a_live_run_lock_refuses_run_and_eval_and_a_killed_one_does_not_block(tiny_recipe):
    from mlxtune.training.session import run

    recipe = load_recipe(tiny_recipe(), ["train.steps=2", "train.eval_every=0", "eval.before=false"])
    target = (tiny_recipe().parent / "runs" / "tiny").absolute()
    proc = _holder(target)
    try:
        started = time.perf_counter()
        with pytest.raises(MlxtuneError, match=rf"{target}: in use by process {proc.pid} on .*wait for that run"):
            run(recipe, "torch")
        assert time.perf_counter() - started < 5  # refused before loading anything
        assert not target.exists()
        target.mkdir()
        (target / METRICS).write_text("")  # a run's directory: eval writes into it, so it takes the lock
        with pytest.raises(MlxtuneError, match=f"process {proc.pid}"):
            with locked_if_run(target):
                pass
        (target / METRICS).unlink()
        target.rmdir()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = target.parent / ".tiny.lock"
    assert lock.read_text().split()[0] == str(proc.pid)  # the dead holder's file stays, stale
    run_dir, summary = run(recipe, "torch")
    assert summary["steps"] == 2 and (run_dir.path / "adapters").is_dir()
    assert not lock.exists()  # released at the end


def test_the_lock_is_released_on_error_and_is_not_reentrant(tmp_path):
    path = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with run_lock(path) as lock:
            assert lock.read_text().split()[0] == str(os.getpid())
            with pytest.raises(MlxtuneError, match=f"in use by process {os.getpid()}"):
                with run_lock(path):
                    pass
            raise RuntimeError("boom")
    assert not lock.exists()
    with run_lock(path):
        pass


def test_lock_in_an_unwritable_place_is_a_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MlxtuneError, match=rf"{blocker}: cannot write the run's lock file there .*output.dir"):
        with run_lock(blocker / "run"):
            pass


def test_a_folder_left_aside_by_a_kill_between_the_renames_is_put_back(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.log({"event": "start", "step": 0})
    with run.best_dir({"step": 2}) as tmp:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "w.bin").write_bytes(b"best-2")
    with run.checkpoint_dir(2, {"step": 2}) as tmp:
        (tmp / "w.bin").write_bytes(b"ckpt-2")
    # atomic_dir renames best -> .best.old, then .best.tmp -> best: killed between the two
    os.replace(run.path / "best", run.path / ".best.old")
    (run.path / ".best.tmp").mkdir()
    (run.path / "checkpoints" / ".step-000004.tmp").mkdir()  # killed while writing a checkpoint
    again = RunDir.create(run.path, resume=True)
    assert (again.path / "best" / "adapter" / "w.bin").read_bytes() == b"best-2" and again.best()[0] == 2
    assert sorted(p.name for p in again.path.iterdir()) == ["best", "checkpoints", "metrics.jsonl"]
    assert [p.name for p in (again.path / "checkpoints").iterdir()] == ["step-000002"]
    # the next writer of that folder recovers it too, before writing: a failed write keeps it
    os.replace(run.path / "best", run.path / ".best.old")
    with pytest.raises(RuntimeError):
        with again.best_dir({"step": 4}):
            raise RuntimeError("crash while writing")
    assert (again.path / "best" / "adapter" / "w.bin").read_bytes() == b"best-2"
    # eval recovers what it finds, under the lock
    os.replace(run.path / "best", run.path / ".best.old")
    with locked_if_run(run.path):
        assert run.best()[0] == 2


# ---------------------------------------------------------------- a full disk

def test_disk_full_is_recognised_in_the_libraries_words():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # safetensors (Rust) reports the OS error in its message only
    assert is_disk_full(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("[save_safetensors] failed") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied")) and not is_disk_full(RuntimeError("x"))


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


DISK_FULL = r"disk full while writing it \(about [\d,.]+ (bytes|MiB|GiB) needed, [\d,.]+ (bytes|MiB|GiB) free there\)"


def test_disk_full_in_a_checkpoint_keeps_the_previous_one_and_resume_goes_on(tiny_recipe, monkeypatch):
    from backends.torch_peft import TorchBackend
    from mlxtune.training.session import load_backend_with_adapter, run

    path = tiny_recipe()
    recipe = load_recipe(path, ["train.save_every=2", "train.eval_every=2", "train.steps=8", "eval.before=false"])
    original = TorchBackend.save_optimizer
    calls, seen = {"n": 0}, {}

    def full_disk(self, target):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 4, half written
            seen["ckpt"] = _tree(target.parents[1] / "step-000002")
            seen["best"] = _tree(target.parents[2] / "best")
            target.write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return original(self, target)

    monkeypatch.setattr(TorchBackend, "save_optimizer", full_disk)
    with pytest.raises(MlxtuneError, match=r"checkpoints/step-000004: " + DISK_FULL + r"; nothing was replaced") as e:
        run(recipe, "torch")
    needed = int(re.search(r"about ([\d,]+) bytes needed", str(e.value)).group(1).replace(",", ""))
    run_path = path.parent / "runs" / "tiny"
    ckpt = run_path / "checkpoints" / "step-000002"
    assert needed >= sum(len(b) for b in seen["ckpt"].values())  # at least the previous checkpoint's size
    assert [p.name for p in (run_path / "checkpoints").iterdir()] == ["step-000002"]  # no temp folder left
    assert _tree(ckpt) == seen["ckpt"] and _tree(run_path / "best") == seen["best"]
    assert not list(run_path.glob(".*"))  # nor a lock file
    b = load_backend_with_adapter("torch", Path(recipe.model.path), recipe)  # step 2 still loads
    b.setup_optimizer(recipe)
    b.load_adapter(ckpt / "adapter")
    b.load_optimizer(ckpt / "optimizer.safetensors")
    monkeypatch.setattr(TorchBackend, "save_optimizer", original)  # space freed
    run_dir, summary = run(recipe, "torch", resume=True)
    assert summary["steps"] == 8 and sorted(e["step"] for e in _events(run_path, "train")) == list(range(1, 9))


def test_disk_full_while_replacing_best_keeps_the_previous_best(tiny_recipe, monkeypatch):
    from backends.torch_peft import TorchBackend
    from mlxtune.training.session import run

    path = tiny_recipe()
    recipe = load_recipe(path, ["train.eval_every=1", "train.steps=6", "eval.before=false"])
    original = TorchBackend.save_adapter
    seen = {}

    def full_disk(self, target):
        best = target.parents[1] / "best"
        if target.parent.name == ".best.tmp" and best.is_dir():  # replacing an earlier best/
            seen["best"] = _tree(best)
            (target.parent / "partial").write_bytes(b"\0" * 100)
            raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
        return original(self, target)

    monkeypatch.setattr(TorchBackend, "save_adapter", full_disk)
    with pytest.raises(MlxtuneError, match=r"/best: " + DISK_FULL):
        run(recipe, "torch")
    run_path = path.parent / "runs" / "tiny"
    assert seen and _tree(run_path / "best") == seen["best"]
    assert not list(run_path.glob(".*"))


def test_disk_full_while_logging_is_a_clean_error(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path / "run")
    run.log({"event": "start", "step": 0})

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(MlxtuneError, match=r"metrics.jsonl: " + DISK_FULL + "; the events logged before are intact"):
        run.log({"event": "train", "step": 1})
    assert run.events()[0] == {"event": "start", "step": 0}


# ---------------------------------------------------------------- non-finite steps

def _optimizer_tensors(backend, path):
    """The saved optimizer state without random-number state (dropout is off here anyway)."""
    from safetensors.numpy import load_file

    backend.save_optimizer(path)
    return {k: v for k, v in load_file(str(path)).items() if "rng" not in k and "random" not in k}


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_non_finite_step_changes_neither_adapter_nor_optimizer(backend_name, tiny_recipe, tiny_model_dir, tmp_path):
    from mlxtune.models.source import read_config
    from mlxtune.training.session import load_backend_with_adapter

    recipe = load_recipe(tiny_recipe(), ["adapter.dropout=0.0"])
    b = load_backend_with_adapter(backend_name, tiny_model_dir, recipe)
    b.setup_optimizer(recipe)
    (t1, m1), (t2, m2) = ragged_batches(0, 2, int(read_config(tiny_model_dir)["vocab_size"]))
    denom = int(m1[:, 1:].sum() + m2[:, 1:].sum())
    b.train_step(t1, m1, denom, update=False, lr=1e-2)
    b.train_step(t2, m2, denom, update=True, lr=1e-2)  # a real step first: the AdamW moments are not 0
    good = b.get_adapter_weights()
    # weights so large that the forward pass overflows: NaN loss and gradients
    poisoned = {k: np.full_like(v, 1e30) for k, v in good.items()}
    b.set_adapter_weights(poisoned)
    before = _optimizer_tensors(b, tmp_path / "before.safetensors")
    loss = b.train_step(t1, m1, denom, update=False, lr=1e-2) + b.train_step(t2, m2, denom, update=True, lr=1e-2)
    assert not math.isfinite(loss) and not math.isfinite(b.last_grad_norm)
    after = b.get_adapter_weights()
    assert all(np.array_equal(after[k], poisoned[k]) for k in poisoned)  # not updated
    opt = _optimizer_tensors(b, tmp_path / "after.safetensors")
    assert opt.keys() == before.keys() and all(np.array_equal(opt[k], before[k]) for k in opt)
    # the bad gradients were dropped: the next window trains normally from the good weights
    b.set_adapter_weights(good)
    loss = b.train_step(t1, m1, denom, update=False, lr=1e-2) + b.train_step(t2, m2, denom, update=True, lr=1e-2)
    assert math.isfinite(loss) and math.isfinite(b.last_grad_norm)
    new = b.get_adapter_weights()
    assert all(np.isfinite(v).all() for v in new.values()) and any(not np.array_equal(new[k], good[k]) for k in good)


def _poison_step(monkeypatch, cls, step, check):
    """``cls.train_step`` whose 2 passes of optimizer step ``step`` run on overflowing adapter
    weights; ``check(weights_after_the_update, poisoned)`` runs after it, then the weights from
    before are put back (an outside blow-up the loop must survive)."""
    original, calls, saved = cls.train_step, {"n": 0}, {}

    def train_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * step - 1:
            saved["good"] = self.get_adapter_weights()
            saved["bad"] = {k: np.full_like(v, 1e30) for k, v in saved["good"].items()}
            self.set_adapter_weights(saved["bad"])
        out = original(self, *a, **kw)
        if calls["n"] == 2 * step:
            check(self.get_adapter_weights(), saved["bad"])
            self.set_adapter_weights(saved["good"])
        return out

    monkeypatch.setattr(cls, "train_step", train_step)
    return saved


def test_non_finite_stop_names_the_step_and_the_last_good_checkpoint(tiny_recipe, monkeypatch):
    from backends.torch_peft import TorchBackend
    from mlxtune.training.session import run

    path = tiny_recipe()
    _poison_step(monkeypatch, TorchBackend, 5, lambda after, bad: None)
    recipe = load_recipe(path, ["train.save_every=2", "eval.before=false"])
    with pytest.raises(MlxtuneError, match=r"step 5 gave a non-finite loss nan, gradient norm nan, so the adapter was not "
                       r"updated; the last good checkpoint is .*checkpoints/step-000004; lower train.lr"):
        run(recipe, "torch")
    run_path = path.parent / "runs" / "tiny"
    (event,) = _events(run_path, "nonfinite")
    assert event["step"] == 5 and event["loss"] == "nan" and event["action"] == "stop"
    assert [e["step"] for e in _events(run_path, "train")] == [1, 2, 3, 4]


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_non_finite_skip_logs_the_step_and_trains_on(backend_name, tiny_recipe, monkeypatch):
    from mlxtune.training.session import run

    if backend_name == "torch":
        from backends.torch_peft import TorchBackend as cls
    else:
        from backends.apple_mlx import MLXBackend as cls
    checked = []

    def unchanged(after, bad):
        checked.append(all(np.array_equal(after[k], bad[k]) for k in bad))

    _poison_step(monkeypatch, cls, 5, unchanged)
    recipe = load_recipe(tiny_recipe(), ["train.on_nonfinite=skip", "adapter.dropout=0.0"])
    run_dir, summary = run(recipe, backend_name)
    assert checked == [True]
    (event,) = _events(run_dir.path, "nonfinite")
    assert event["step"] == 5 and event["action"] == "skip"
    train = _events(run_dir.path, "train")
    assert [e["step"] for e in train] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in train)
    assert summary["steps"] == 12 and math.isfinite(summary["final"]["loss"])
