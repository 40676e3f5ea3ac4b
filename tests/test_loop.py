"""The core loop and batching: schedule, batch order, token-weighted accumulation, resume."""

import json
import os
import signal

import numpy as np
import pytest

from mlxtune.training import loop
from mlxtune.data.batching import collate, epoch_batches, total_steps
from mlxtune.data.records import Example
from mlxtune.evaluation.scoring import evaluate
from mlxtune.recipe.schema import TrainConfig
from mlxtune.recipe.loading import load_recipe


def test_schedule_warmup_cosine_linear_constant():
    cfg = TrainConfig(steps=10, lr=1.0, warmup_steps=2, schedule="cosine")
    lrs = [loop.lr_at(s, 10, cfg) for s in range(10)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # monotone decay after warmup
    assert lrs[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))
    lin = TrainConfig(steps=10, lr=1.0, warmup_ratio=0.2, schedule="linear")
    assert [loop.lr_at(s, 10, lin) for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    const = TrainConfig(steps=10, lr=0.1, schedule="constant")
    assert {loop.lr_at(s, 10, const) for s in range(10)} == {0.1}


def test_epoch_batches_cover_each_example_once_and_are_seeded():
    lengths = list(np.random.default_rng(0).integers(5, 100, size=53))
    for bucket in (False, True):
        a = epoch_batches(lengths, 4, seed=1, epoch=0, bucket=bucket)
        assert sorted(i for b in a for i in b) == list(range(53))
        assert a == epoch_batches(lengths, 4, seed=1, epoch=0, bucket=bucket)
        assert a != epoch_batches(lengths, 4, seed=1, epoch=1, bucket=bucket)
    padding = {}
    for bucket in (False, True):
        batches = epoch_batches(lengths, 4, seed=1, epoch=0, bucket=bucket)
        padding[bucket] = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    assert padding[True] < padding[False] / 3  # bucketing removes most of the padding


def test_total_steps():
    assert total_steps(90, 4, 2, 2.0, 0) == 23  # ceil(2 * 23 / 2)
    assert total_steps(90, 4, 2, 0.0, 7) == 7


class CountingBackend:
    """Records the rows of every forward pass and which pass ended a step."""

    last_grad_norm = 0.0

    def __init__(self):
        self.passes = []

    def train_step(self, tokens, mask, denom, update, lr):
        self.passes.append((len(tokens), update))
        return float(mask.sum())

    def peak_memory(self):
        return 0

    def save_adapter(self, path):
        path.mkdir(parents=True, exist_ok=True)


def test_training_by_epochs_never_borrows_from_an_extra_epoch(tmp_path):
    from mlxtune.recipe.schema import EvalConfig
    from mlxtune.runs.rundir import RunDir

    # 10 examples, micro batch 4: 3 micro batches an epoch, 9 in 3 epochs; 2 per step -> 5 steps,
    # the last one only the 9th micro batch (not one from a 4th epoch)
    examples = [Example(np.arange(1, 6, dtype=np.int32), np.array([0, 0, 1, 1, 1], bool)) for _ in range(10)]
    cfg = TrainConfig(epochs=3, micro_batch=4, grad_accum=2, lr=1e-3)
    backend = CountingBackend()
    run = RunDir.create(tmp_path / "run")
    ui = RecordingUI()
    loop.train(backend, examples, [], cfg, EvalConfig(before=False), run, 0, ui=ui)
    trains = [e for e in run.events() if e["event"] == "train"]
    assert [e["step"] for e in trains] == [1, 2, 3, 4, 5]
    assert {e["epoch"] for e in trains} == {0, 1, 2}
    assert sum(rows for rows, _ in backend.passes) == 30  # every example exactly 3 times
    assert len(backend.passes) == 9 and [u for _, u in backend.passes].count(True) == 5 and backend.passes[-1][1]
    assert ui.events[0] == ("start", 5, 0) and ui.events[-1] == ("close",)
    assert [e[1] for e in ui.events if e[0] == "step"] == [1, 2, 3, 4, 5]
    assert all(e[4] is None for e in ui.events if e[0] == "step")  # no eval set, no eval loss


class RecordingUI:
    """A TrainUI that remembers what the loop told it."""

    def __init__(self):
        self.events = []

    def message(self, text):
        self.events.append(("message", text))

    def start(self, total, done):
        self.events.append(("start", total, done))

    def step(self, step, loss, tokens_per_s, eval_loss):
        self.events.append(("step", step, loss, tokens_per_s, eval_loss))

    def close(self):
        self.events.append(("close",))

    def generation(self):
        return None


def test_train_state_keeps_the_checkpoint_keys():
    """state.json of a checkpoint has the keys it had as a dict, and old ones still load."""
    old = {"step": 5, "total": 12, "best": 4.2, "best_step": 4, "base": {"loss": 5.0}, "pass_rows": 4}
    state = loop.TrainState.from_dict(old)
    assert state.to_dict() == old and list(state.to_dict()) == list(old)
    fresh = loop.TrainState(total=12)
    assert fresh.to_dict() == {"step": 0, "total": 12, "best": None, "best_step": None, "base": None}
    assert loop.TrainState.from_dict({k: v for k, v in old.items() if k != "pass_rows"}).pass_rows is None


def test_collate_masks():
    ex = [Example(np.array([5, 6, 7], np.int32), np.array([0, 0, 1], bool)), Example(np.array([5, 8], np.int32), np.array([0, 1], bool))]
    b = collate(ex, pad_id=0)
    assert b.tokens.tolist() == [[5, 6, 7], [5, 8, 0]]
    assert b.mask.tolist() == [[False, False, True], [False, True, False]]
    assert b.full_mask.tolist() == [[False, True, True], [False, True, False]]
    assert b.n_targets == 2


# ---------------------------------------------------------------- with the torch backend

torch = pytest.importorskip("torch")


def _backend(recipe):
    from mlxtune.training.session import load_backend_with_adapter
    from mlxtune.models.source import resolve_model

    b = load_backend_with_adapter("torch", resolve_model(recipe.model.path), recipe)
    b.setup_optimizer(recipe)
    return b


def _batches(recipe):
    from mlxtune.data.records import build_dataset
    from mlxtune.models.source import load_tokenizer, resolve_model

    ds = build_dataset(recipe, load_tokenizer(resolve_model(recipe.model.path)))
    return ds


def test_accumulation_is_token_weighted(tiny_recipe):
    """One step over 4 examples == the same 4 examples as 2 micro batches of 2: the loss is
    sum(NLL) / all target tokens of the window, whatever the split and padding."""
    recipe = load_recipe(tiny_recipe(), ["adapter.dropout=0.0", "train.grad_clip=0.5"])
    ds = _batches(recipe)
    exs = sorted(ds.train, key=len)[:2] + sorted(ds.train, key=len)[-2:]  # very different lengths
    whole = collate(exs, 0)
    parts = [collate(exs[:2], 0), collate(exs[2:], 0)]
    denom = whole.n_targets
    a, b = _backend(recipe), _backend(recipe)
    loss_a = a.train_step(whole.tokens, whole.mask, denom, update=True, lr=1e-2)
    loss_b = sum(b.train_step(p.tokens, p.mask, denom, update=i == 1, lr=1e-2) for i, p in enumerate(parts))
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    wa, wb = a.get_adapter_weights(), b.get_adapter_weights()
    assert max(np.abs(wa[k] - wb[k]).max() for k in wa) < 1e-6
    assert max(np.abs(wa[k]).max() for k in wa if k.endswith("lora_B")) > 1e-4  # it did update


def test_eval_base_equals_adapter_at_init_and_masks_differ(tiny_recipe):
    recipe = load_recipe(tiny_recipe())
    ds = _batches(recipe)
    b = _backend(recipe)
    from mlxtune.data.batching import eval_batches

    batches = eval_batches(ds.eval, 3, 0)
    base, tuned = evaluate(b, batches, adapter=False), evaluate(b, batches, adapter=True)
    assert base["loss"] == pytest.approx(tuned["loss"], abs=1e-6)  # B = 0 at init
    assert base["tokens_full"] > base["tokens"] > 0
    assert base["ppl"] == pytest.approx(np.exp(base["loss"]))


def _train_losses(run_dir):
    return {e["step"]: e["loss"] for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == "train"}


def test_ctrl_c_checkpoints_and_resume_continues_identically(tiny_recipe, monkeypatch):
    from backends.torch_peft import TorchBackend
    from mlxtune.errors import MlxtuneError
    from mlxtune.training.session import run

    path = tiny_recipe()
    full_dir, _ = run(load_recipe(path, ["output.name=full", "adapter.dropout=0.1"]), "torch")

    calls = {"n": 0}
    original = TorchBackend.train_step

    def interrupting(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # inside step 5 (2 micro batches a step)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **kw)

    monkeypatch.setattr(TorchBackend, "train_step", interrupting)
    recipe = load_recipe(path, ["output.name=cut", "adapter.dropout=0.1"])
    with pytest.raises(MlxtuneError, match=r"interrupted at step 5/12.*--resume") as e:
        run(recipe, "torch")
    assert e.value.exit_code == 130
    cut_dir = full_dir.path.parent / "cut"
    state = json.loads((cut_dir / "checkpoints" / "step-000005" / "state.json").read_text())
    assert list(state) == ["step", "total", "best", "best_step", "base", "pass_rows"] and state["step"] == 5
    assert not list((cut_dir / "checkpoints").glob(".*"))  # no half-written folder
    monkeypatch.setattr(TorchBackend, "train_step", original)
    run(recipe, "torch", resume=True)
    full, resumed = _train_losses(full_dir.path), _train_losses(cut_dir)
    assert sorted(resumed) == list(range(1, 13))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
