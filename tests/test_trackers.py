"""output.report_to: TensorBoard event files mirror metrics.jsonl (also across a resume); wandb and
trackio get the same scalars through their init / log / finish calls; a tracker that is not
installed is refused when the recipe is checked."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from conftest import crash_train_step
from mlxtune.errors import MlxtuneError
from mlxtune.recipe.loading import load_recipe
from mlxtune.runs.rundir import read_metrics

# tag prefix -> (metrics.jsonl event, its "adapter" flag)
PREFIXES = {"train": ("train", None), "eval": ("eval", True), "eval_base": ("eval", False)}


def _matching_event(events: list[dict], tag: str, step: int) -> dict:
    prefix = tag.rsplit("/", 1)[0]
    kind, adapter = PREFIXES[prefix]
    found = [e for e in events if e["event"] == kind and e["step"] == step
             and (adapter is None or e.get("adapter", True) is adapter)]
    assert len(found) == 1, (tag, step, found)
    return found[0]


def _tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _assert_mirrors(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar equals its metrics.jsonl value, and every number metrics.jsonl has
    for a tag is in TensorBoard (once per step)."""
    events = read_metrics(run)
    tb = _tensorboard_scalars(run)
    for tag, points in tb.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: a step shown twice: {steps}"
        key = tag.rsplit("/", 1)[1]
        for step, value in points:
            assert value == pytest.approx(_matching_event(events, tag, step)[key], rel=1e-6, abs=1e-7), (tag, step)
        prefix = tag.rsplit("/", 1)[0]
        kind, adapter = PREFIXES[prefix]
        logged = [e["step"] for e in events if e["event"] == kind and isinstance(e.get(key), (int, float))
                  and (adapter is None or e.get("adapter", True) is adapter)]
        assert steps == logged, f"{tag}: TensorBoard has steps {steps}, metrics.jsonl {logged}"
    return tb


def test_tensorboard_scalars_match_metrics_jsonl(tiny_recipe):
    pytest.importorskip("tensorboard")
    pytest.importorskip("sacrebleu")
    from mlxtune.training.session import run

    recipe = load_recipe(tiny_recipe(), ["output.report_to=['tensorboard']", "train.steps=4", "train.eval_every=2",
                                         "eval.metrics=['bleu', 'chrf']", "eval.max_new_tokens=4", "eval.generate_examples=2"])
    run_dir, _ = run(recipe, "torch")
    assert list((run_dir.path / "tensorboard").glob("events.out.tfevents.*"))
    tb = _assert_mirrors(run_dir.path)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "eval/loss", "eval/loss_full", "eval/ppl",
                "eval/bleu", "eval/chrf", "eval_base/loss", "eval_base/bleu"):
        assert tag in tb, f"{tag} missing from {sorted(tb)}"
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in tb["eval/loss"]] == [2, 4] and [s for s, _ in tb["eval_base/loss"]] == [0]
    # counts and strings stay out: they are not curves
    assert not any(t.endswith(("/tokens", "/generated", "/bleu_signature")) for t in tb)


def test_resumed_run_appends_and_drops_the_interrupted_steps(tiny_recipe, monkeypatch):
    """Cut inside step 6 after the step-4 checkpoint: the cut run logged step 5, metrics.jsonl
    drops it on resume and TensorBoard shows the resumed run's step 5 only."""
    pytest.importorskip("tensorboard")
    from backends.torch_peft import TorchBackend

    from mlxtune.training.session import run

    sets = ["output.report_to=['tensorboard']", "train.steps=6", "train.eval_every=3", "train.save_every=4"]
    path = tiny_recipe()
    original = crash_train_step(monkeypatch, TorchBackend, 11)  # 2 passes a step: the second pass of step 6
    with pytest.raises(RuntimeError, match="simulated"):
        run(load_recipe(path, sets), "torch")
    cut = _tensorboard_scalars(Path(load_recipe(path, sets).output.dir) / "tiny")
    assert [s for s, _ in cut["train/loss"]] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(TorchBackend, "train_step", original)
    run_dir, _ = run(load_recipe(path, sets), "torch", resume=True)
    tb = _assert_mirrors(run_dir.path)
    assert [s for s, _ in tb["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in tb["eval/loss"]] == [3, 6]
    assert len(list((run_dir.path / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not replaced


def _fake_tracker(name: str, calls: list) -> types.ModuleType:
    module = types.ModuleType(name)
    module.init = lambda **kw: calls.append((name, "init", kw))
    module.log = lambda values, step=None: calls.append((name, "log", (dict(values), step)))
    module.finish = lambda: calls.append((name, "finish", None))
    return module


def test_wandb_and_trackio_get_the_scalars(tiny_recipe, monkeypatch):
    from mlxtune.training.session import run

    calls: list = []
    for name in ("wandb", "trackio"):
        monkeypatch.setitem(sys.modules, name, _fake_tracker(name, calls))
    recipe = load_recipe(tiny_recipe(), ["output.report_to=['wandb', 'trackio']", "train.steps=2", "train.eval_every=2"])
    run_dir, _ = run(recipe, "torch")
    assert not (run_dir.path / "tensorboard").exists()
    events = read_metrics(run_dir.path)
    for name in ("wandb", "trackio"):
        mine = [(what, arg) for who, what, arg in calls if who == name]
        assert mine[0][0] == "init" and mine[-1] == ("finish", None)
        assert mine[0][1]["name"] == "tiny" and mine[0][1]["project"] == "mlxtune"
        assert mine[0][1]["config"]["output"]["report_to"] == ["wandb", "trackio"]
        logs = [arg for what, arg in mine if what == "log"]
        assert [step for _, step in logs] == [0, 1, 2, 2]  # base eval, two train steps, the eval at step 2
        assert logs[1][0] == pytest.approx({"train/loss": events[2]["loss"], "train/lr": events[2]["lr"],
                                            "train/grad_norm": events[2]["grad_norm"]})
        assert logs[0][0]["eval_base/loss"] == pytest.approx(events[1]["loss"])
        assert logs[3][0]["eval/ppl"] == pytest.approx(events[4]["ppl"])
    assert [e["event"] for e in events[:5]] == ["start", "eval", "train", "train", "eval"]
    assert dict(calls[0][2])["dir"] == str(run_dir.path)  # wandb's own files go under the run


@pytest.mark.parametrize("name", ["wandb", "trackio", "tensorboard"])
def test_a_tracker_that_is_not_installed_is_refused(tiny_recipe, monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # what an import that fails looks like
    with pytest.raises(MlxtuneError, match=rf"output.report_to: {name} is not installed; pip install {name}"):
        load_recipe(tiny_recipe(), [f"output.report_to=['{name}']"])
    load_recipe(tiny_recipe(), [f"output.report_to=['{name}']"], planning=True)  # `mlxtune plan` needs none


@pytest.mark.parametrize("value, words", [("['mlflow']", "unknown 'mlflow'"),
                                          ("['tensorboard', 'tensorboard']", "'tensorboard' listed twice"),
                                          ("'tensorboard'", "output.report_to")])
def test_report_to_values_are_checked(tiny_recipe, value, words):
    with pytest.raises(MlxtuneError, match=words):
        load_recipe(tiny_recipe(), [f"output.report_to={value}"])
