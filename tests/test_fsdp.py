"""``train.shard_base`` (issue 16): FSDP2 ``fully_shard`` of the frozen base under torchrun.

Two processes with the base sharded train what one process with twice the micro batch trains
(the adapter stays whole on every rank and its gradients are summed as without sharding), each
rank holding half of the base; the saved adapter loads with stock peft; and the places FSDP2
cannot go are refused before a model is loaded. ``pytest -rP`` prints the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlxtune.errors import MlxtuneError
from test_distributed import TORCHRUN, _kill_a_rank_after_checkpoint, adapter, check, env, losses, max_diff, mlxtune, write_recipe

SHARD = ("--set", "train.shard_base=true")


def start_event(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_two_sharded_processes_match_one_with_twice_the_micro_batch(tmp_path, tiny_model_dir, method):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    m = ("--set", f"adapter.method={method}")
    two = check(TORCHRUN + mlxtune(recipe, "--backend", "torch", *SHARD, *m), tmp_path)
    check([sys.executable] + mlxtune(recipe, "--backend", "torch", *m, "--set", "train.micro_batch=4", "--set", "output.name=one"), tmp_path)
    a, b = losses(tmp_path / "runs/two"), losses(tmp_path / "runs/one")
    loss_diff = max(abs(x - y) for x, y in zip(a, b))
    weight_diff = max_diff(adapter(tmp_path / "runs/two"), adapter(tmp_path / "runs/one"))
    held = start_event(tmp_path / "runs/two")["backend"]["shard_base"]
    print(f"{method}, 2 sharded processes vs 1: per-step loss max |diff| {loss_diff:.3g}, adapter max |diff| {weight_diff:.3g}; rank 0: {held}")
    assert "shard_base" in two.stdout + two.stderr
    assert len(a) == len(b) == 5 and loss_diff <= 1e-6 and weight_diff <= 1e-6
    local, total = map(int, held.split()[1:4:2])
    assert abs(local - total / 2) <= 0.01 * total  # half, up to the padding of odd first dimensions
    assert "shard_base" not in start_event(tmp_path / "runs/one")["backend"]
    if method == "lora":  # the saved adapter is stock peft's
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "runs/two/adapters")
        got = {k: v for k, v in model.state_dict().items() if "lora_" in k}
        assert got and all(torch.isfinite(v).all() for v in got.values())


def test_a_killed_sharded_run_resumes_to_the_same_result(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir, steps=6, save_every=2)
    _kill_a_rank_after_checkpoint(TORCHRUN + mlxtune(recipe, "--backend", "torch", *SHARD), tmp_path, tmp_path / "runs/two")
    assert not (tmp_path / "runs/two/adapters").exists()
    check(TORCHRUN + mlxtune(recipe, "--backend", "torch", *SHARD, "--resume"), tmp_path)
    check(TORCHRUN + mlxtune(recipe, "--backend", "torch", *SHARD, "--set", "output.name=ref"), tmp_path)
    events = [json.loads(line) for line in (tmp_path / "runs/two/metrics.jsonl").read_text().splitlines()]
    assert len([e for e in events if e["event"] == "resume"]) == 1
    assert losses(tmp_path / "runs/two") == pytest.approx(losses(tmp_path / "runs/ref"), abs=1e-12)
    diff = max_diff(adapter(tmp_path / "runs/two"), adapter(tmp_path / "runs/ref"))
    print(f"sharded, 2 processes killed after a checkpoint and resumed vs uninterrupted: adapter max |diff| {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.parametrize("backend, sets, launched, why", [
    ("mlx", {}, 2, "only the torch backend shards the base"),
    ("torch", {}, 1, "it needs 2 or more processes"),
    ("torch", {"adapter": {"method": "qlora"}}, 2, "cannot shard a bitsandbytes-quantized base"),
    ("torch", {"model": {"quantize_bits": 8}}, 2, "cannot shard a bitsandbytes-quantized base"),
    ("torch", {"adapter": {"method": "prompt"}}, 2, '"prompt" is not supported'),
    ("torch", {"adapter": {"method": "prefix"}}, 2, '"prefix" is not supported'),
])
def test_shard_base_is_refused_where_fsdp_cannot_shard_the_base(backend, sets, launched, why):
    from mlxtune.recipe.loading import recipe_from_dict

    recipe = recipe_from_dict({"data": {"train": "t.jsonl", "format": "prompt_completion"}, "train": {"shard_base": True}, **sets})
    with pytest.raises(MlxtuneError, match=f"train.shard_base = true: .*{why}.*set train.shard_base = false"):
        recipe.check_shard_base(backend, launched)
    recipe.train.shard_base = False
    recipe.check_shard_base(backend, launched)  # off: nothing to refuse


def test_one_process_with_shard_base_is_refused_before_loading(tmp_path, tiny_model_dir):
    recipe = write_recipe(tmp_path, tiny_model_dir)
    p = subprocess.run([sys.executable] + mlxtune(recipe, "--backend", "torch", *SHARD), cwd=tmp_path, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "error: train.shard_base = true: it needs 2 or more processes" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "runs/two").exists()
