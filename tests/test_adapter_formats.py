"""Every adapter folder a run writes (adapters/, best/adapter, checkpoints/step-N/adapter) holds
both formats, whichever backend trained it: the native one at the top, the other in ``peft/`` (MLX
runs) or ``mlx/`` (torch runs). Each is checked with the stock loader of its format on the tiny
Llama (2 blocks, rope theta 50000 saved the transformers-5 way, fp32): stock peft on the MLX run's
PEFT copy and stock mlx-lm on the torch run's mlx-lm copy give mlxtune's own logits for the same
weights. Run with ``pytest -rP`` to see the measured differences.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")

from conftest import train_run  # noqa: E402
from mlxtune.adapters.lora import LoraSpec, write_mlx_lm_or_say_why  # noqa: E402
from mlxtune.recipe.loading import recipe_from_dict  # noqa: E402

TOL = 1e-4
FOLDERS = ("adapters", "best/adapter", "checkpoints/step-000002/adapter")


def _recipe(model_dir: Path, method: str, layers):
    return recipe_from_dict({
        "model": {"path": str(model_dir)},
        "data": {"train": "x.jsonl", "format": "chat"},
        "adapter": {"method": method, "rank": 4, "alpha": 8, "layers": layers},
        "train": {"seed": 7, "lr": 1e-2, "steps": 3, "save_every": 2, "eval_every": 2, "micro_batch": 2, "grad_accum": 1},
    })


def _run(backend: str, model_dir: Path, recipe, path: Path) -> Path:
    from mlxtune.data.batching import eval_batches
    from mlxtune.data.records import Example

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(1)
    train = [Example(rng.integers(1, vocab, 12).astype(np.int32), np.arange(12) >= 4) for _ in range(4)]
    train_run(backend, model_dir, recipe, train, eval_batches(train[:2], 2, 0), path)
    return path


def _tokens(model_dir: Path) -> np.ndarray:
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return np.random.default_rng(2).integers(1, vocab, (2, 16)).astype(np.int32)


def _mlxtune_logits(backend: str, model_dir: Path, recipe, adapter: Path | None, tokens: np.ndarray) -> np.ndarray:
    """Logits of mlxtune's own backend with ``adapter`` loaded (None: adapter off)."""
    from mlxtune.training.session import load_backend_with_adapter

    b = load_backend_with_adapter(backend, model_dir, recipe)
    if adapter is not None:
        b.load_adapter(adapter)
    b.model.eval()
    if backend == "mlx":
        import mlx.core as mx

        if adapter is None:
            with b.adapter.disabled():
                return np.array(b.model(mx.array(tokens)))
        return np.array(b.model(mx.array(tokens)))
    import torch

    with torch.no_grad():
        if adapter is None:
            with b.adapter.disabled():
                return b.model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()
        return b.model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


def _with_rope_theta(model_dir: Path, dest: Path) -> Path:
    """The base folder as mlx-lm 0.32 needs it: a top-level rope_theta (it ignores rope_parameters)."""
    from mlxtune.models.source import _with_rope_theta as patch

    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    assert "rope_theta" not in cfg  # the trap is armed
    (dest / "config.json").write_text(json.dumps(patch(cfg)))
    return dest


def _check_both_formats(run: Path, native: str) -> None:
    other = "mlx" if native == "peft" else "peft"
    files = {"peft": "adapter_model.safetensors", "mlx": "adapters.safetensors"}
    for folder in FOLDERS:
        d = run / folder
        assert (d / files[native]).is_file() and (d / "adapter_config.json").is_file(), d
        assert (d / other / files[other]).is_file() and (d / other / "adapter_config.json").is_file(), d


CASES = [("lora", "all"), ("dora", "all"), ("lora", [0]), ("dora", [0])]


@pytest.mark.parametrize("method,layers", CASES)
def test_mlx_run_loads_in_stock_peft(tiny_model_dir, tmp_path, method, layers):
    """The MLX run's peft/ copy in stock ``PeftModel.from_pretrained`` = mlxtune's MLX backend."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tiny_model_dir, method, layers)
    run = _run("mlx", tiny_model_dir, recipe, tmp_path / "run")
    _check_both_formats(run, "mlx")
    tokens = _tokens(tiny_model_dir)
    ours = _mlxtune_logits("mlx", tiny_model_dir, recipe, run / "adapters", tokens)
    base = _mlxtune_logits("mlx", tiny_model_dir, recipe, None, tokens)

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(run / "adapters" / "peft")).eval()
    with torch.no_grad():
        stock = model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    diff, moved = float(np.abs(stock - ours).max()), float(np.abs(ours - base).max())
    print(f"MLX {method} layers={layers}: stock peft vs mlxtune max |logits diff| = {diff:.2e} (adapter moves logits by {moved:.2e})")
    assert moved > 10 * TOL  # the adapter was trained: the comparison can fail
    assert diff < TOL
    # and mlxtune's torch backend reads the peft/ copy to the same weights as the native folder
    from mlxtune.training.session import load_backend_with_adapter

    t = load_backend_with_adapter("torch", tiny_model_dir, recipe)
    t.load_adapter(run / "adapters" / "peft")
    m = load_backend_with_adapter("mlx", tiny_model_dir, recipe)
    m.load_adapter(run / "adapters")
    tw, mw = t.get_adapter_weights(), m.get_adapter_weights()
    assert set(tw) == set(mw) and all(np.array_equal(tw[k], mw[k]) for k in tw)


@pytest.mark.parametrize("method,layers", CASES)
def test_torch_run_loads_in_stock_mlx_lm(tiny_model_dir, tmp_path, method, layers):
    """The torch run's mlx/ copy in stock ``mlx_lm.utils.load(base, adapter_path=...)`` (as
    ``mlx_lm.generate --adapter-path`` loads it) = mlxtune's torch backend."""
    import mlx.core as mx
    from mlx_lm.utils import load

    recipe = _recipe(tiny_model_dir, method, layers)
    run = _run("torch", tiny_model_dir, recipe, tmp_path / "run")
    _check_both_formats(run, "peft")
    cfg = json.loads((run / "adapters" / "mlx" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == method and cfg["lora_parameters"]["scale"] == 2.0
    if layers == [0]:  # not "the last N": written for the last 2 blocks, block 1 with lora_b = 0
        assert cfg["num_layers"] == 2 and "adapted blocks [0] only" in cfg["mlxtune"]["note"]
        print("non-contiguous layers, mlxtune.note:", cfg["mlxtune"]["note"])
    tokens = _tokens(tiny_model_dir)
    ours = _mlxtune_logits("torch", tiny_model_dir, recipe, run / "adapters", tokens)
    base = _mlxtune_logits("torch", tiny_model_dir, recipe, None, tokens)

    model, _ = load(str(_with_rope_theta(tiny_model_dir, tmp_path / "base")), adapter_path=str(run / "adapters" / "mlx"))
    model.eval()
    stock = np.array(model(mx.array(tokens)))
    diff, moved = float(np.abs(stock - ours).max()), float(np.abs(ours - base).max())
    print(f"torch {method} layers={layers}: stock mlx-lm vs mlxtune max |logits diff| = {diff:.2e} (adapter moves logits by {moved:.2e})")
    assert moved > 10 * TOL
    assert diff < TOL


def test_mlx_lm_format_refused_outside_blocks(tmp_path):
    """An adapted layer outside model.layers.N cannot be said in mlx-lm's format: nothing but
    WHY_NOT.txt is written there, and it names the layer and where the adapter still is."""
    w = {"lm_head.lora_A": np.zeros((4, 8), np.float32), "lm_head.lora_B": np.zeros((16, 4), np.float32)}
    why = write_mlx_lm_or_say_why(tmp_path / "mlx", w, LoraSpec(4, 8.0, 0.0, False, ["lm_head"], 2))
    print("refused:", why)
    assert why is not None and why.startswith("lm_head: mlx-lm's adapter format adapts only layers inside the blocks")
    assert "PEFT's format only" in why
    assert sorted(p.name for p in (tmp_path / "mlx").iterdir()) == ["WHY_NOT.txt"]
    assert (tmp_path / "mlx" / "WHY_NOT.txt").read_text().strip() == why
