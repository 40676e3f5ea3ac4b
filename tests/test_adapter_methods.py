"""DoRA and QLoRA (issue 7): DoRA step-by-step parity between the backends in fp32, DoRA files
across backends, QLoRA (and LoRA/DoRA on a quantized base) on MLX, and the torch backend's clear
refusal to quantize without CUDA.

Tiny random models (hidden 64, so quantization groups of 64 fit); the embedded SmolLM2-135M only
in the ``slow`` test. Run with OpenBLAS preloaded on Linux for speed (tests/conftest.py does it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("backends.torch_peft")

import mlx.nn as nn  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from test_mlx_backend import batches, make_model, make_recipe  # noqa: E402

from backends.apple_mlx import MLXBackend  # noqa: E402
from backends.mlx_adapters import _dora_class  # noqa: E402
from backends.mlx_config import mlx_model_config  # noqa: E402
from backends.torch_peft import TorchBackend  # noqa: E402
from mlxtune.adapters.lora import MAGNITUDE  # noqa: E402
from mlxtune.errors import MlxtuneError  # noqa: E402
from mlxtune.training.session import load_backend_with_adapter  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


def recipe(method: str = "lora", bits: int = 0, group: int = 64, **train):
    r = make_recipe(**train)
    r.adapter.method = method
    r.model.quantize_bits = bits
    r.model.quantize_group_size = group
    return r


def window_steps(backend, data, steps: int, accum: int, lr: float) -> list[float]:
    """``steps`` optimizer steps alternating two accumulation windows; per-step mean loss."""
    out = []
    for s in range(steps):
        micro = data[(s % 2) * accum:(s % 2 + 1) * accum]
        denom = sum(int(m[:, 1:].sum()) for _, m in micro)
        out.append(sum(backend.train_step(t, m, denom, i == accum - 1, lr * (s + 1) / steps)
                       for i, (t, m) in enumerate(micro)) / denom)
    return out


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# ------------------------------------------------------------------ DoRA: same maths on both backends


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v have a bias (added after the magnitude)
def test_dora_train_steps_match_between_backends(tmp_path, tiny, arch):
    model_dir = tiny if arch == "llama" else make_model(tmp_path / arch, arch)
    r = recipe("dora")
    mb, tb = load_backend_with_adapter("mlx", model_dir, r), load_backend_with_adapter("torch", model_dir, r)
    init = mb.get_adapter_weights()
    # the magnitude starts as the row norms of the base weight, on both backends
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    w = hf.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.allclose(init[f"model.layers.1.mlp.down_proj.{MAGNITUDE}"], np.linalg.norm(w, axis=1), atol=1e-5)
    assert max_diff(init, tb.get_adapter_weights()) < 1e-5
    for b in (mb, tb):
        b.setup_optimizer(r)
    data = batches(3, 4)
    rows = [(a, c, mb.last_grad_norm, tb.last_grad_norm)
            for a, c in zip(*[window_steps(b, data, 5, 2, r.train.lr) for b in (mb, tb)])]
    devs = [abs(a - c) for a, c, _, _ in rows]
    print(f"DoRA {arch} per-step loss |mlx - torch|:", ", ".join(f"{d:.1e}" for d in devs))
    assert max(devs) < 1e-4
    assert rows[4][0] < rows[2][0] < rows[0][0]
    wa, wb = mb.get_adapter_weights(), tb.get_adapter_weights()
    print(f"final adapter weights (magnitudes included) max |diff| = {max_diff(wa, wb):.1e}")
    assert max_diff(wa, wb) < 1e-4
    mags = [k for k in wa if k.endswith(MAGNITUDE)]
    assert len(mags) == 14 and max(float(np.abs(wa[k] - init[k]).max()) for k in mags) > 1e-4  # trained


def test_dora_dropout_goes_where_peft_puts_it():
    """One layer in training mode with the same dropout mask on both sides: the MLX layer computes
    peft's W x + (g - 1) W drop(x) + g s B A drop(x) + bias, not mlx-lm's g (W x + s B A drop(x))."""
    rng = np.random.default_rng(0)
    d_in, d_out, r, scale = 16, 8, 4, 2.0
    W, bias = rng.normal(size=(d_out, d_in)).astype(np.float32), rng.normal(size=d_out).astype(np.float32)
    A, B = rng.normal(size=(r, d_in)).astype(np.float32), rng.normal(size=(d_out, r)).astype(np.float32)
    mag = rng.uniform(0.5, 2.0, d_out).astype(np.float32)
    x = rng.normal(size=(3, d_in)).astype(np.float32)
    keep = (rng.uniform(size=x.shape) > 0.3).astype(np.float32) / 0.7

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out)

    net = Net()
    with torch.no_grad():
        net.lin.weight.copy_(torch.from_numpy(W))
        net.lin.bias.copy_(torch.from_numpy(bias))
    pm = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=r * scale, lora_dropout=0.3, target_modules=["lin"], use_dora=True))
    layer = pm.base_model.model.lin

    class FixedMask(torch.nn.Module):
        def forward(self, t):
            return t * torch.from_numpy(keep)

    layer.lora_dropout["default"] = FixedMask()
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
        layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(mag))
    pm.train()
    want = layer(torch.from_numpy(x)).detach().numpy()

    base = nn.Linear(d_in, d_out)
    base.weight, base.bias = mx.array(W), mx.array(bias)
    ours = _dora_class().wrap(base, r=r, dropout=0.3, scale=scale)
    ours.lora_a, ours.lora_b, ours.m = mx.array(A.T), mx.array(B.T), mx.array(mag)
    ours.dropout = lambda t: t * mx.array(keep)
    ours.train()
    got = np.array(ours(mx.array(x)))
    assert np.abs(got - want).max() < 1e-4
    ours.eval()  # without dropout the two forms coincide: g (W x + s B A x) + bias
    g = mag / np.linalg.norm(W + scale * B @ A, axis=1)
    assert np.abs(np.array(ours(mx.array(x))) - (g * (x @ W.T + scale * x @ A.T @ B.T) + bias)).max() < 1e-4
    assert np.abs(got - np.array(ours(mx.array(x)))).max() > 1e-2  # the mask mattered


def test_dora_files_cross_backends(tiny, tmp_path):
    """mlx-lm DoRA files load on torch and PEFT DoRA files on MLX with the same eval loss; the
    mlx-lm file loads in mlx-lm itself; a DoRA file under a LoRA recipe is refused by name."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    r = recipe("dora")
    t, m = batches(9, 1)[0]
    for src, dst in (("mlx", "torch"), ("torch", "mlx")):
        a = load_backend_with_adapter(src, tiny, r)
        a.setup_optimizer(r)
        for tt, mm in batches(8, 2):
            a.train_step(tt, mm, int(mm[:, 1:].sum()), True, 1e-2)
        a.save_adapter(tmp_path / src)
        b = load_backend_with_adapter(dst, tiny, r)
        b.load_adapter(tmp_path / src)
        assert max_diff(a.get_adapter_weights(), b.get_adapter_weights()) < 1e-6
        la, lb = a.eval_step(t, {"r": m})["r"], b.eval_step(t, {"r": m})["r"]
        assert abs(la - lb) < 1e-4 * max(1.0, abs(la)), (src, la, lb)
        assert b.eval_step(t, {"r": m}, adapter=False)["r"] != lb
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "dora"
    assert json.loads((tmp_path / "torch" / "adapter_config.json").read_text())["use_dora"] is True

    mb = load_backend_with_adapter("mlx", tiny, r)
    mb.load_adapter(tmp_path / "mlx")
    mb.model.eval()
    tokens = mx.array(batches(2, 1)[0][0])
    model, _ = load_model(tiny, model_config=mlx_model_config(tiny)[1])
    load_adapters(model, str(tmp_path / "mlx"))  # mlx-lm's own DoRALinear
    model.eval()
    assert np.abs(np.array(model(tokens)) - np.array(mb.model(tokens))).max() < 1e-4

    lora = load_backend_with_adapter("mlx", tiny, recipe("lora"))
    with pytest.raises(MlxtuneError, match=r"\(dora, rank 4\) does not match the recipe \(lora, rank 4\)"):
        lora.load_adapter(tmp_path / "torch")


# ------------------------------------------------------------------ QLoRA on MLX


def _prequantized(src: Path, dst: Path, bits: int = 4, group: int = 64) -> Path:
    """What `mlx_lm.convert -q` writes: packed weights and "quantization" in config.json."""
    shutil.copytree(src, dst)
    for f in dst.glob("model*.safetensors"):
        f.unlink()
    model, _ = load_model_mlx(src)
    nn.quantize(model, group_size=group, bits=bits)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization"] = cfg["quantization_config"] = {"group_size": group, "bits": bits, "mode": "affine"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def load_model_mlx(path: Path):
    from mlx_lm.utils import load_model

    return load_model(path, model_config=mlx_model_config(path)[1])


@pytest.mark.parametrize("method,bits", [("qlora", 0), ("dora", 4), ("lora", 8)])
def test_quantized_base_trains_saves_loads_generates_on_mlx(tiny, tmp_path, method, bits):
    r = recipe(method, bits, lr=1e-2)
    b = load_backend_with_adapter("mlx", tiny, r)
    want = 4 if method == "qlora" else bits
    assert b.describe()["quantization"] == f"mlx affine {want}-bit, group 64 (quantized at load)"
    blk = b.model.model.layers[0]
    assert isinstance(blk.self_attn.q_proj.linear, nn.QuantizedLinear) and blk.self_attn.q_proj.linear.bits == want
    assert isinstance(b.model.lm_head, nn.QuantizedLinear) and isinstance(b.model.model.embed_tokens, nn.QuantizedEmbedding)
    b.setup_optimizer(r)
    losses = window_steps(b, batches(3, 4), 6, 2, r.train.lr)
    print(f"{method} on a {want}-bit base, per-step loss:", ", ".join(f"{x:.3f}" for x in losses))
    assert losses[4] < losses[2] < losses[0]

    t, m = batches(9, 1)[0]
    tuned, base = b.eval_step(t, {"r": m}), b.eval_step(t, {"r": m}, adapter=False)
    b.save_adapter(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["fine_tune_type"] == ("dora" if method == "dora" else "lora")
    b2 = load_backend_with_adapter("mlx", tiny, r)
    assert b2.eval_step(t, {"r": m}, adapter=False) == base  # the same quantized base
    b2.load_adapter(tmp_path / "ad")
    assert abs(b2.eval_step(t, {"r": m})["r"] - tuned["r"]) < 1e-4
    prompts = [t[0, :5], t[1, :3]]
    for adapter in (True, False):
        out = b2.generate(prompts, 4, adapter=adapter)
        assert [len(o) for o in out] == [4, 4]


def test_prequantized_folder_and_base_eval_use_the_quantized_base(tiny, tmp_path):
    q = _prequantized(tiny, tmp_path / "q4")
    plain = load_backend_with_adapter("mlx", q, recipe("lora"))
    assert plain.describe()["quantization"] == "mlx affine 4-bit, group 64 (already quantized in the model folder)"
    at_load = load_backend_with_adapter("mlx", tiny, recipe("qlora"))
    full = load_backend_with_adapter("mlx", tiny, recipe("lora"))
    t, m = batches(9, 1)[0]
    base_q = at_load.eval_step(t, {"r": m}, adapter=False)
    assert plain.eval_step(t, {"r": m}, adapter=False) == base_q  # same quantization, same numbers
    assert full.eval_step(t, {"r": m}, adapter=False) != base_q  # "adapter off" is the quantized base
    load_backend_with_adapter("mlx", q, recipe("qlora"))  # asks for what the folder holds: fine
    with pytest.raises(MlxtuneError, match="already quantized.*model.quantize_bits = 4"):
        load_backend_with_adapter("mlx", q, recipe("lora", 8))
    with pytest.raises(MlxtuneError, match="MLX-quantized model folder.*--backend mlx"):
        TorchBackend().load(q, recipe("lora"), [0, 1])


def test_group_size_must_divide_every_quantized_layer(tiny):
    with pytest.raises(MlxtuneError, match=r"model.quantize_group_size = 128 does not divide the input size 64"):
        MLXBackend().load(tiny, recipe("qlora", group=128), [0, 1])


def test_quantization_is_recorded_in_the_run_and_report(tiny_recipe):
    from mlxtune.recipe.loading import load_recipe
    from mlxtune.runs.rundir import read_metrics
    from mlxtune.training.session import run

    r = load_recipe(tiny_recipe(), ['adapter.method="qlora"', "train.steps=4", "train.eval_every=2"])
    run_dir, summary = run(r, "mlx")
    start = next(e for e in read_metrics(run_dir.path) if e["event"] == "start")
    assert start["backend"]["quantization"] == "mlx affine 4-bit, group 64 (quantized at load)"
    assert "quantization mlx affine 4-bit, group 64" in (run_dir.path / "report.md").read_text()
    assert summary["final"]["loss"] < summary["base"]["loss"]


# ------------------------------------------------------------------ torch without CUDA


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the bitsandbytes path is taken")
def test_torch_refuses_a_quantized_base_without_cuda(tiny):
    with pytest.raises(MlxtuneError) as e:
        TorchBackend().load(tiny, recipe("qlora"), [0, 1])
    msg = str(e.value)
    assert 'adapter.method = "qlora"' in msg and "CUDA" in msg and "--backend mlx" in msg and "quantize_bits = 0" in msg
    with pytest.raises(MlxtuneError, match=r"model.quantize_bits = 8: .*CUDA"):
        TorchBackend().load(tiny, recipe("dora", 8), [0, 1])


def test_validate_says_torch_cannot_quantize_here(tmp_path, monkeypatch):
    import mlxtune.models.quantization as q
    from mlxtune.cli.main import cli

    monkeypatch.setattr(q, "cuda_visible", lambda: False)
    path = tmp_path / "r.toml"
    (tmp_path / "d.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    path.write_text('[model]\npath = "org/model"\n[adapter]\nmethod = "qlora"\n[data]\ntrain = "d.jsonl"\nformat = "alpaca"\n')
    res = CliRunner().invoke(cli, ["validate", str(path), "--backend", "torch"])
    assert res.exit_code != 0
    assert "bitsandbytes, which needs a CUDA GPU" in res.output and "--backend mlx" in res.output
    res = CliRunner().invoke(cli, ["validate", str(path), "--backend", "mlx"])
    assert res.exit_code == 0 and "base quantized: mlx affine 4-bit, group 64" in res.output, res.output
    res = CliRunner().invoke(cli, ["validate", str(path), "--backend", "torch", "--set", 'adapter.method="lora"'])
    assert res.exit_code == 0, res.output  # a full-precision base needs no CUDA


# ------------------------------------------------------------------ the embedded SmolLM2-135M (slow)


@pytest.mark.slow
def test_smollm2_qlora_on_mlx(embedded_model_dir, tmp_path):
    """QLoRA on the real model, briefly: quantized at load, the loss falls, base eval is the
    quantized base, the adapter saves, loads and generates."""
    from mlxtune.recipe.schema import ALL_PROJECTIONS
    from mlxtune.recipe.loading import recipe_from_dict

    r = recipe_from_dict({
        "data": {"train": "x.jsonl", "format": "chat"},
        "adapter": {"method": "qlora", "rank": 8, "alpha": 16.0, "target_modules": list(ALL_PROJECTIONS)},
        "train": {"steps": 4, "lr": 2e-3, "seed": 3, "micro_batch": 2},
    })
    b = load_backend_with_adapter("mlx", embedded_model_dir, r)
    assert b.describe()["quantization"].startswith("mlx affine 4-bit, group 64")
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 49152, (2, 24)).astype(np.int32)
    mask = np.zeros((2, 24), dtype=bool)
    mask[:, 8:] = True
    denom = int(mask[:, 1:].sum())
    b.setup_optimizer(r)
    base = b.eval_step(tokens, {"r": mask}, adapter=False)["r"] / denom
    losses = [b.train_step(tokens, mask, denom, True, r.train.lr) / denom for _ in range(4)]
    print("SmolLM2 QLoRA per-step loss:", ", ".join(f"{x:.3f}" for x in losses))
    assert abs(losses[0] - base) < 1e-3  # B = 0: the first step sees the quantized base
    assert losses[-1] < losses[0]
    b.save_adapter(tmp_path / "ad")
    b2 = load_backend_with_adapter("mlx", embedded_model_dir, r)
    b2.load_adapter(tmp_path / "ad")
    assert abs(b2.eval_step(tokens, {"r": mask})["r"] - b.eval_step(tokens, {"r": mask})["r"]) < 1e-3
    assert len(b2.generate([tokens[0, :8]], 3)[0]) == 3
