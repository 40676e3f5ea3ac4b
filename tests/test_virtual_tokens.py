"""Prompt tuning and prefix tuning on both backends (issue 7, part 2), on the tiny fp32 Llama
(GQA: 4 query heads, 2 key/value heads) from ``tests/conftest.py``:

- the core's initial values have PEFT's layout (PEFT's own TEXT init gives the same rows);
- the torch backend's loss (body + chunked head, real tokens only) equals PEFT's own forward
  with labels (-100 on padding and prompt): virtual positions never carry loss;
- MLX and torch agree step by step (within 1e-4) with accumulation and padding, for prompt tuning
  (random and text init) and prefix tuning (with and without the projection MLP); eval with the
  adapter on and off;
- adapters saved on one backend load on the other (and in PEFT) with the same eval loss;
- generation: batched equals one by one, torch equals MLX, and torch equals PEFT's forward rerun
  over the whole sequence (no cache); stock PEFT ``generate`` is checked against the same reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import ragged_batches, train_run  # noqa: E402
from mlxtune.errors import MlxtuneError  # noqa: E402
from mlxtune.recipe.loading import recipe_from_dict  # noqa: E402
from mlxtune.training.session import load_backend_with_adapter  # noqa: E402
from mlxtune.adapters.virtual import (  # noqa: E402
    VirtualSpec,
    init_virtual,
    read_embedding_rows,
    text_init_ids,
)

INIT_TEXT = "translate english to turkish"
KINDS = {
    "prompt": {"method": "prompt", "num_virtual_tokens": 6},
    "prompt-text": {"method": "prompt", "num_virtual_tokens": 7, "prompt_init": "text", "prompt_init_text": INIT_TEXT},
    "prefix": {"method": "prefix", "num_virtual_tokens": 5},
    "prefix-mlp": {"method": "prefix", "num_virtual_tokens": 4, "prefix_projection": True, "prefix_hidden": 24},
}


def make_recipe(model_dir, kind: str, **train):
    t = {"seed": 7, "lr": 1e-2, "grad_clip": 1.0, "weight_decay": 0.01, "micro_batch": 2, "grad_accum": 2}
    return recipe_from_dict({
        "model": {"path": str(model_dir)},
        "data": {"train": "x.jsonl", "format": "chat"},
        "adapter": KINDS[kind],
        "train": t | train,
    })


def vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def batches(model_dir, seed: int, n: int, b: int = 3, lens=(9, 13, 7, 11)):
    return ragged_batches(seed, n, vocab(model_dir), b, lens)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    cache = {}

    def get(name: str, kind: str):
        if (name, kind) not in cache:
            cache[name, kind] = load_backend_with_adapter(name, tiny_model_dir, make_recipe(tiny_model_dir, kind))
        return cache[name, kind]

    return get


# ---------------------------------------------------------------- the core's initial values


def test_shapes_follow_peft_gqa_layout(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    recipe = make_recipe(tiny_model_dir, "prefix-mlp")
    spec = VirtualSpec.from_config(cfg, recipe.adapter)
    assert (spec.kv_heads, spec.head_dim, spec.kv_width) == (2, 16, 32)  # GQA: 2 of 4 heads
    assert spec.shapes() == {"embedding.weight": (4, 32), "transform.0.weight": (24, 32), "transform.0.bias": (24,),
                             "transform.2.weight": (2 * 2 * 32, 24), "transform.2.bias": (128,)}
    for kind in KINDS:
        r = make_recipe(tiny_model_dir, kind)
        s = VirtualSpec.from_config(cfg, r.adapter)
        pm = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                 __import__("backends.torch_virtual", fromlist=["x"]).peft_config(s))
        assert {k: tuple(v.shape) for k, v in pm.prompt_encoder["default"].state_dict().items()} == s.shapes(), kind
    w = init_virtual(spec, 3)
    assert w.keys() == spec.shapes().keys() and all(w[k].shape == spec.shapes()[k] for k in w)
    assert all(np.array_equal(w[k], init_virtual(spec, 3)[k]) for k in w)  # seeded
    assert not np.array_equal(w["embedding.weight"], init_virtual(spec, 4)["embedding.weight"])
    assert abs(float(w["transform.0.weight"].max())) <= 1 / np.sqrt(32)


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_both_backends_refuse_weights_that_do_not_fit(tiny_model_dir, backend):
    """One rule (VirtualSpec.check_weights) for both backends: a missing or misshapen tensor is
    refused before anything is written into the model."""
    b = load_backend_with_adapter(backend, tiny_model_dir, make_recipe(tiny_model_dir, "prefix-mlp"))
    good = b.get_adapter_weights()
    with pytest.raises(ValueError, match="do not match"):
        b.set_adapter_weights({k: v for k, v in good.items() if k != "transform.2.bias"})
    with pytest.raises(ValueError, match=r"transform.0.bias: shape \(23,\) != \(24,\)"):
        b.set_adapter_weights(good | {"transform.0.bias": np.zeros(23, np.float32)})
    assert all(np.array_equal(v, b.get_adapter_weights()[k]) for k, v in good.items())


def test_text_init_equals_peft_text_init(tiny_model_dir, tiny_tokenizer):
    ids = text_init_ids(tiny_tokenizer, INIT_TEXT, 7)
    assert ids[0] == tiny_tokenizer.bos_token_id and len(ids) == 7  # 5 tokens with BOS, repeated then cut
    assert ids[5:] == ids[:2]
    assert text_init_ids(tiny_tokenizer, INIT_TEXT, 3) == ids[:3]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7, prompt_tuning_init="TEXT",
                                     prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=str(tiny_model_dir))
    want = peft.get_peft_model(base, config).prompt_encoder["default"].embedding.weight.detach().numpy()
    backend = load_backend_with_adapter("mlx", tiny_model_dir, make_recipe(tiny_model_dir, "prompt-text"))
    assert np.array_equal(backend.get_adapter_weights()["embedding.weight"], want)


def test_embedding_rows_read_with_numpy_also_bf16(tiny_model_dir, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    table = base.get_input_embeddings().weight.detach()
    ids = [5, 0, 17, 5]
    assert np.array_equal(read_embedding_rows(tiny_model_dir, ids), table[ids].numpy())
    base.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert np.array_equal(read_embedding_rows(tmp_path / "bf16", ids), table[ids].to(torch.bfloat16).float().numpy())
    with pytest.raises(MlxtuneError, match="outside the embedding"):
        read_embedding_rows(tiny_model_dir, [10**6])


# ---------------------------------------------------------------- torch: the loss equals PEFT's


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-mlp"])
def test_torch_loss_equals_peft_forward_with_labels(loaded, tiny_model_dir, kind):
    """mlxtune's loss (real-token hidden states through the chunked head) is PEFT's own forward
    with labels -100 on padding and prompt: the masks line up with the real tokens, and no
    virtual position carries loss."""
    b = loaded("torch", kind)
    tokens, mask = batches(tiny_model_dir, 1, 1, b=3, lens=(12,))[0]
    n_targets = int(mask[:, 1:].sum())
    ours = b.eval_step(tokens, {"r": mask})["r"] / n_targets
    labels = torch.from_numpy(np.where(mask, tokens, -100)).long()
    b.model.eval()
    with torch.no_grad():
        theirs = float(b.model(input_ids=torch.from_numpy(tokens).long(), labels=labels).loss)
        base = float(b.model.get_base_model()(input_ids=torch.from_numpy(tokens).long(), labels=labels).loss)
    assert abs(ours - theirs) < 1e-5, (ours, theirs)
    assert abs(b.eval_step(tokens, {"r": mask}, adapter=False)["r"] / n_targets - base) < 1e-5
    assert abs(ours - base) > 1e-3  # the virtual tokens change the loss


# ---------------------------------------------------------------- MLX == torch


def run_steps(backend, recipe, data, steps):
    backend.setup_optimizer(recipe)
    accum, out = recipe.train.grad_accum, []
    for s in range(steps):
        micro = data[(s % 2) * accum:(s % 2 + 1) * accum]
        denom = sum(int(m[:, 1:].sum()) for _, m in micro)
        lr = recipe.train.lr * (s + 1) / steps
        out.append(sum(backend.train_step(t, m, denom, i == accum - 1, lr) for i, (t, m) in enumerate(micro)) / denom)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_train_steps_match_between_backends(tiny_model_dir, kind):
    recipe = make_recipe(tiny_model_dir, kind)
    data = batches(tiny_model_dir, 3, 4)
    losses, backends = {}, {}
    for name in ("mlx", "torch"):
        backends[name] = load_backend_with_adapter(name, tiny_model_dir, recipe)
        assert backends[name].trainable_parameters() == VirtualSpec.from_config(
            json.loads((tiny_model_dir / "config.json").read_text()), recipe.adapter).parameters()
        losses[name] = run_steps(backends[name], recipe, data, 5)
    devs = [abs(a - b) for a, b in zip(losses["mlx"], losses["torch"])]
    print(f"{kind}: per-step |mlx - torch|:", ", ".join(f"{d:.1e}" for d in devs))
    assert max(devs) < 1e-4
    assert all(abs(a - b) < 1e-4 * max(1.0, b) for a, b in [(backends["mlx"].last_grad_norm, backends["torch"].last_grad_norm)])
    assert losses["mlx"][4] < losses["mlx"][0]  # it learns (same window at steps 0, 2, 4)
    wa, wb = backends["mlx"].get_adapter_weights(), backends["torch"].get_adapter_weights()
    assert max(float(np.abs(wa[k] - wb[k]).max()) for k in wa) < 1e-4
    # eval with both masks, adapter on and off
    tokens, mask = batches(tiny_model_dir, 9, 1, lens=(15,))[0]
    full = tokens != 0
    full[:, 0] = False
    masks = {"response": mask, "full": full}
    for adapter in (True, False):
        a, b = backends["mlx"].eval_step(tokens, masks, adapter=adapter), backends["torch"].eval_step(tokens, masks, adapter=adapter)
        assert all(abs(a[k] - b[k]) < 1e-4 * max(1.0, abs(b[k])) for k in masks), (adapter, a, b)
    assert backends["mlx"].eval_step(tokens, masks) != backends["mlx"].eval_step(tokens, masks, adapter=False)


def test_compiled_mlx_step_matches_eager(tiny_model_dir):
    recipe = make_recipe(tiny_model_dir, "prefix-mlp")
    data = batches(tiny_model_dir, 4, 4)
    out = {}
    for compiled in (True, False):
        b = load_backend_with_adapter("mlx", tiny_model_dir, recipe)
        b.compile = compiled
        out[compiled] = run_steps(b, recipe, data, 3)
    assert np.allclose(out[True], out[False], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-mlp"])
def test_adapters_cross_load_between_backends_and_peft(tiny_model_dir, tmp_path, kind):
    recipe = make_recipe(tiny_model_dir, kind)
    data = batches(tiny_model_dir, 5, 4)
    tokens, mask = batches(tiny_model_dir, 6, 1, lens=(12,))[0]
    trained = {}
    for name in ("torch", "mlx"):
        b = load_backend_with_adapter(name, tiny_model_dir, recipe)
        run_steps(b, recipe, data, 2)
        b.save_adapter(tmp_path / name)
        trained[name] = b.eval_step(tokens, {"r": mask})["r"]
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert cfg["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[recipe.adapter.method]
        assert cfg["num_virtual_tokens"] == recipe.adapter.num_virtual_tokens
    for src in ("torch", "mlx"):
        for dst in ("torch", "mlx"):
            b = load_backend_with_adapter(dst, tiny_model_dir, recipe)
            b.load_adapter(tmp_path / src)
            got = b.eval_step(tokens, {"r": mask})["r"]
            assert abs(got - trained[src]) < 1e-4, (src, dst, got, trained[src])
        # PEFT itself loads either backend's folder (inference mode: the projected prefix)
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path / src)).eval()
        labels = torch.from_numpy(np.where(mask, tokens, -100)).long()
        with torch.no_grad():
            loss = float(pm(input_ids=torch.from_numpy(tokens).long(), labels=labels).loss)
        assert abs(loss - trained[src] / mask[:, 1:].sum()) < 1e-5, (src, loss)
    if kind == "prefix-mlp":  # the projected prefix alone loads into a recipe without the MLP
        plain = make_recipe(tiny_model_dir, "prefix-mlp")
        plain.adapter.prefix_projection, plain.adapter.prefix_hidden = False, 0
        b = load_backend_with_adapter("mlx", tiny_model_dir, plain)
        b.load_adapter(tmp_path / "torch")
        assert abs(b.eval_step(tokens, {"r": mask})["r"] - trained["torch"]) < 1e-4
    other = make_recipe(tiny_model_dir, kind)
    other.adapter.num_virtual_tokens += 1
    with pytest.raises(MlxtuneError, match="num_virtual_tokens"):
        load_backend_with_adapter("mlx", tiny_model_dir, other).load_adapter(tmp_path / "torch")


# ---------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    rng = np.random.default_rng(5)
    return [rng.integers(1, vocab(tiny_model_dir), n).astype(np.int32) for n in (3, 7, 5, 1, 9, 4)]


@pytest.mark.parametrize("kind", ["prompt", "prefix-mlp"])
def test_generation_batched_equals_one_by_one_and_backends_agree(loaded, prompts, kind):
    out = {}
    for name in ("torch", "mlx"):
        b = loaded(name, kind)
        batched = b.generate(prompts, 10)
        assert batched == [b.generate([p], 10)[0] for p in prompts], name
        assert len({tuple(o) for o in batched}) > 1
        out[name] = batched
        base = b.generate(prompts, 10, adapter=False)
        assert base != batched
        out[name + "-base"] = base
        out[name + "-sampled"] = b.generate(prompts, 10, temperature=1.0, top_p=0.9, seed=3)
    assert out["torch"] == out["mlx"]
    assert out["torch-base"] == out["mlx-base"]
    assert out["torch-sampled"] == out["mlx-sampled"]


def greedy_by_peft_forward(model, prompt: np.ndarray, n: int) -> list[int]:
    """The reference: greedy tokens from PEFT's own forward over the whole sequence at every step.
    No KV cache is carried between steps, so no cache API of transformers or PEFT is involved."""
    seq = torch.from_numpy(prompt).long()[None]
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(input_ids=seq).logits[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[out[-1]]])], dim=1)
    return out


def peft_generate(model, prompt: np.ndarray, n: int) -> list[int]:
    ids = torch.from_numpy(prompt).long()[None]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", ["prompt", "prefix", "prefix-mlp"])
def test_torch_generation_equals_peft_forward(loaded, prompts, kind):
    """mlxtune's cached generation equals PEFT's forward recomputed over the whole sequence."""
    b = loaded("torch", kind)
    b.model.eval()
    for p in prompts[1:3]:
        assert b.generate([p], 6)[0] == greedy_by_peft_forward(b.model, p, 6)


# transformers 5.24.0 keeps generate's cache under `cache`; peft 0.21.2 looks for it under
# `past_key_values`, so it re-injects prompt tuning's virtual tokens at every decode step and
# hands prefix tuning's prefix over in a keyword transformers then ignores (the text equals the
# base model's). pyproject.toml excludes that version; the lock pins 5.23.0.
PEFT_GENERATE_BROKEN = transformers.__version__ == "5.24.0" and peft.__version__ == "0.21.2"


@pytest.mark.xfail(PEFT_GENERATE_BROKEN, strict=True, reason="peft 0.21.2 generate under transformers 5.24.0")
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_stock_peft_generate_equals_peft_forward(loaded, prompts, kind):
    """Stock PEFT's ``generate`` (its own prefix cache, positions and mask) on the same adapter:
    which stack does what when the two disagree."""
    b = loaded("torch", kind)
    b.model.eval()
    for p in prompts[1:3]:
        assert peft_generate(b.model, p, 6) == greedy_by_peft_forward(b.model, p, 6)


# ---------------------------------------------------------------- through the core's loop


def test_prompt_tuning_through_the_loop_on_both_backends(tiny_model_dir, tmp_path):
    from mlxtune.training import loop
    from mlxtune.data.batching import eval_batches
    from mlxtune.runs.compare import compare_runs
    from mlxtune.data.records import Example
    from mlxtune.runs.rundir import RunDir

    recipe = make_recipe(tiny_model_dir, "prompt-text", steps=6, eval_every=3, save_every=3, schedule="cosine", warmup_steps=1)
    rng = np.random.default_rng(0)

    def examples(n):
        out = []
        for _ in range(n):
            length = int(rng.integers(8, 16))
            mask = np.zeros(length, dtype=bool)
            mask[length // 2:] = True
            out.append(Example(rng.integers(1, vocab(tiny_model_dir), length).astype(np.int32), mask))
        return out

    train, evals = examples(16), eval_batches(examples(4), 4, 0)
    for name in ("mlx", "torch"):
        b = load_backend_with_adapter(name, tiny_model_dir, recipe)
        b.setup_optimizer(recipe)
        loop.train(b, train, evals, recipe.train, recipe.eval, RunDir.create(tmp_path / name), 0)
        assert (tmp_path / name / "adapters" / "adapter_model.safetensors").is_file()
    res = compare_runs(tmp_path / "mlx", tmp_path / "torch", tol=1e-4)
    assert len(res["train"]) == 6 and res["agree"], res["worst"]


def test_memory_planner_counts_virtual_tokens(tiny_model_dir):
    from mlxtune.planning.memory import StepSetup, estimate

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    for kind in KINDS:
        recipe = make_recipe(tiny_model_dir, kind)
        setup = StepSetup.from_recipe(recipe, "torch", "cpu")
        e = estimate(cfg, setup, 2, 32)
        n = VirtualSpec.from_config(cfg, recipe.adapter).parameters()
        assert e.adapter == n * 4 * 4  # float32 parameters, gradients, AdamW m and v
        longer = make_recipe(tiny_model_dir, kind)
        longer.adapter.num_virtual_tokens += 30
        assert estimate(cfg, StepSetup.from_recipe(longer, "torch", "cpu"), 2, 32).activations > e.activations


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_resume_restores_the_projection_mlp(tiny_model_dir, tmp_path, name):
    """A prefix-with-projection run cut after its step-2 checkpoint and resumed gives the
    uninterrupted run's losses (PEFT's own file holds only the projected prefix; the MLP comes
    from mlxtune's prefix_encoder.safetensors)."""
    from mlxtune.data.batching import eval_batches
    from mlxtune.runs.compare import compare_runs
    from mlxtune.data.records import Example

    recipe = make_recipe(tiny_model_dir, "prefix-mlp", steps=4, save_every=2, eval_every=0, micro_batch=2, grad_accum=1)
    rng = np.random.default_rng(1)
    train = [Example(rng.integers(1, vocab(tiny_model_dir), 10).astype(np.int32), np.arange(10) >= 4) for _ in range(8)]
    evals = eval_batches(train[:2], 2, 0)

    def start(path, resume=False, fail_after=None):
        return train_run(name, tiny_model_dir, recipe, train, evals, path, resume, fail_after)

    start(tmp_path / "full")
    with pytest.raises(RuntimeError, match="simulated"):
        start(tmp_path / "cut", fail_after=3)
    start(tmp_path / "cut", resume=True)
    res = compare_runs(tmp_path / "full", tmp_path / "cut", tol=1e-6)
    assert res["agree"], (res["worst"], res["only_a"], res["only_b"])


@pytest.mark.slow
@pytest.mark.parametrize("adapter, later", [
    ({"method": "prompt", "num_virtual_tokens": 8, "prompt_init": "text", "prompt_init_text": "Answer briefly:"}, 3e-5),
    ({"method": "prefix", "num_virtual_tokens": 8, "prefix_projection": True, "prefix_hidden": 64}, 1e-3),
])
def test_smollm2_steps_match_between_backends(embedded_model_dir, adapter, later):
    """The embedded SmolLM2-135M (GQA 9/3 heads, 30 layers, its real tokenizer for the text init):
    4 steps. Step 1 (same weights on both: one forward and backward) within 3e-5 relative; steps
    2-4 within ``later``. PEFT's normal(0, 1) prefix init sends this model's loss to ~17 on a steep
    slope, where Adam's first, sign-like updates turn fp32 rounding into different weights: on a
    2-core AMD EPYC with OpenBLAS, torch against torch started from the same init times
    (1 +- 3e-7) differs by 2.2e-4 at step 4 and 1.2e-3 at step 6, and MLX against torch by
    5.8e-6 at step 1, 2.5e-4 at step 4 and 1.5e-3 at step 6; torch alone with its own BLAS instead
    of OpenBLAS moves step 4 by 2.3e-4 (the machine this test was first written on kept step 4
    under 2e-4). Prompt tuning stays at ~3e-6 on every step."""
    recipe = recipe_from_dict({"data": {"train": "x.jsonl", "format": "chat"}, "adapter": adapter,
                               "train": {"lr": 1e-3, "grad_clip": 1.0, "seed": 3, "micro_batch": 2, "grad_accum": 1}})
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 49152, (2, 32)).astype(np.int32)
    tokens[1, 26:] = 2
    mask = np.zeros((2, 32), dtype=bool)
    mask[0, 12:] = True
    mask[1, 12:26] = True
    losses = {}
    for name in ("mlx", "torch"):
        b = load_backend_with_adapter(name, embedded_model_dir, recipe)
        b.setup_optimizer(recipe)
        denom = int(mask[:, 1:].sum())
        losses[name] = [b.train_step(tokens, mask, denom, True, 1e-3) / denom for _ in range(4)]
        del b
    devs = [abs(a - c) / c for a, c in zip(losses["mlx"], losses["torch"])]
    print(f"SmolLM2 {adapter['method']}: per-step |mlx - torch| / torch:", ", ".join(f"{d:.1e}" for d in devs))
    assert devs[0] < 3e-5 and max(devs[1:]) < later
    assert losses["mlx"][3] < losses["mlx"][0]


def test_planner_never_checkpoints_prefix_tuning(tiny_model_dir):
    from mlxtune.planning.memory import StepSetup
    from mlxtune.planning.planner import make_plan

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    plans = {}
    for kind in ("prompt", "prefix"):
        setup = StepSetup.from_recipe(make_recipe(tiny_model_dir, kind), "torch", "cpu")
        # a budget where 16 rows of 512 tokens fit only with checkpointing
        plain = make_plan(cfg, setup, 10**12, 16, 512, checkpointing=False).estimate.total
        plans[kind] = make_plan(cfg, setup, int(0.5 * plain), 16, 512, checkpointing="auto")
    assert plans["prompt"].grad_checkpointing is True
    assert plans["prefix"].grad_checkpointing is False
