"""The parity matrix (issue 15): torch (transformers + peft) vs MLX (mlx-lm) on tiny random
models built from config for each architecture both stacks implement, fp32:

- base logits equal transformers' within 1e-4 (max abs);
- 3 LoRA steps through the backends' own ``train_step``: per-step loss within 1e-5;
- greedy generation of 16 tokens: the same ids;
- prompt and prefix tuning, 3 steps each, loss within 1e-5, where the torch backend takes them.

A row the MLX backend cannot reproduce is refused by the product (``backends/mlx_config.py``,
``mlx_refusal``); the test asserts the refusal and the table records its reason. The table is
written to ``<pytest basetemp>/parity_matrix.md`` and printed (``-s``).
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from conftest import build_tiny_tokenizer, ragged_batches  # noqa: E402
from mlxtune.errors import MlxtuneError  # noqa: E402
from mlxtune.recipe.loading import recipe_from_dict  # noqa: E402
from mlxtune.training.session import load_backend_with_adapter  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
QKVO, GLU = ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]
# name -> (model_type, config overrides, LoRA targets, MLX refusal expected (a substring) or None)
ROWS = {
    "llama": ("llama", {}, QKVO + GLU, None),
    "mistral": ("mistral", {"sliding_window": 512}, QKVO + GLU, None),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}, QKVO + GLU, None),
    "qwen3": ("qwen3", {"head_dim": 24}, QKVO + GLU, None),
    "mistral (window 8 on every layer)": ("mistral", {"sliding_window": 8}, QKVO + GLU, "every layer"),
    "gemma2 (no final softcap, MHA)": ("gemma2", {"head_dim": 16, "final_logit_softcapping": None, "sliding_window": 512,
                                                  "num_key_value_heads": 4,
                                                  "attn_logit_softcapping": 50.0, "query_pre_attn_scalar": 16}, QKVO + GLU, None),
    "gemma2 (no final softcap, GQA)": ("gemma2", {"head_dim": 16, "final_logit_softcapping": None, "sliding_window": 512},
                                       QKVO + GLU, "grouped-query"),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 512}, QKVO + GLU, "final-logit softcapping"),
    "gemma3 (pattern 2, window 8)": ("gemma3_text", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16,
                                                     "layer_types": ["sliding_attention", "full_attention"],
                                                     "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
                                     QKVO + GLU, None),
    "gemma3 (2 layers < pattern 6)": ("gemma3_text", {"head_dim": 16, "sliding_window": 8}, QKVO + GLU, "fewer layers"),
    "phi3": ("phi3", {"partial_rotary_factor": 0.5, "pad_token_id": 0}, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], None),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}, ["c_attn"], "c_attn"),
    "granite (logits_scaling 1)": ("granite", {"embedding_multiplier": 6.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                                               "logits_scaling": 1.0}, QKVO + GLU, None),
    "granite": ("granite", {"embedding_multiplier": 6.0, "logits_scaling": 4.0}, QKVO + GLU, "logits_scaling"),
    "olmo2": ("olmo2", {}, QKVO + GLU, None),
    "starcoder2 (gelu)": ("starcoder2", {"hidden_act": "gelu", "sliding_window": None}, QKVO + ["c_fc", "c_proj"], None),
    "starcoder2": ("starcoder2", {"sliding_window": None}, QKVO + ["c_fc", "c_proj"], "activation"),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2, "pad_token_id": 0}, QKVO + GLU, None),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}, QKVO, None),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16}, QKVO, None),
}
NO_INPUT_EMBEDDINGS = ("phi3", "starcoder2", "olmo2")  # mlx-lm bodies without input_embeddings: no prompt tuning on MLX
TABLE: dict[str, dict[str, str]] = {}


def build(path, model_type: str, overrides: dict, tok_dir) -> None:
    torch.manual_seed(0)
    kw = copy.deepcopy(dict(TINY, vocab_size=VOCAB[0]) | overrides)  # transformers edits rope_parameters in place
    if model_type == "gpt2":
        kw = {k: v for k, v in kw.items() if k not in ("hidden_size", "num_hidden_layers", "num_attention_heads", "rope_parameters")}
    cfg = transformers.AutoConfig.for_model(model_type, **kw)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    for f in tok_dir.iterdir():
        shutil.copy(f, path / f.name)


VOCAB = [0]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("matrix_tok")
    VOCAB[0] = len(build_tiny_tokenizer(path))
    yield path
    lines = ["| architecture | base logits max abs | 3-step LoRA loss max diff | greedy 16 ids | prompt / prefix (3 steps) | MLX backend |",
             "|---|---|---|---|---|---|"]
    for name, r in TABLE.items():
        lines.append(f"| {name} | {r.get('logits', '-')} | {r.get('lora', '-')} | {r.get('gen', '-')} | {r.get('virtual', '-')} | {r['mlx']} |")
    out = tmp_path_factory.getbasetemp() / "parity_matrix.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\n(written to {out})")


def recipe(model_dir, targets, **virtual):
    a = virtual or {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": targets}
    return recipe_from_dict({"model": {"path": str(model_dir)}, "data": {"train": "x.jsonl", "format": "chat"}, "adapter": a,
                             "train": {"steps": 3, "lr": 1e-2, "seed": 7, "micro_batch": 2, "grad_accum": 1}})


def three_steps(model_dir, r) -> tuple[float, object, object]:
    """(max per-step |loss_mlx - loss_torch|, the two backends after 3 identical steps)."""
    pair = [load_backend_with_adapter(name, model_dir, r) for name in ("torch", "mlx")]
    devs = []
    for b in pair:
        b.setup_optimizer(r)
    for t, m in ragged_batches(3, 3, VOCAB[0]):
        denom = int(m[:, 1:].sum())
        lt, lm = (b.train_step(t, m, denom, True, 1e-2) / denom for b in pair)
        devs.append(abs(lt - lm))
    return max(devs), pair[0], pair[1]


@pytest.mark.parametrize("name", list(ROWS))
def test_parity_row(name, tok_dir, tmp_path):
    model_type, overrides, targets, refusal = ROWS[name]
    model_dir = tmp_path / "model"
    build(model_dir, model_type, overrides, tok_dir)
    row = TABLE.setdefault(name, {"mlx": "accepted"})
    r = recipe(model_dir, targets)
    if refusal:
        from backends.apple_mlx import MLXBackend

        with pytest.raises(MlxtuneError, match=refusal) as e:
            MLXBackend().load(model_dir, r, [0, 1])
        row["mlx"] = "refused: " + str(e.value).split(": ", 1)[1].replace("|", "/")
        return
    tokens = np.random.default_rng(1).integers(0, VOCAB[0], (2, 24)).astype(np.int32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
    dev, tb, mb = three_steps(model_dir, r)
    with mb._adapter_on(False):  # the base model: LoRA layers out
        logit_dev = float(np.abs(np.array(mb.model(mx.array(tokens))) - ref).max())
    row["logits"], row["lora"] = f"{logit_dev:.1e}", f"{dev:.1e}"
    prompts = [tokens[0, :7], tokens[1, :4]]
    if model_type == "gemma3_text":  # sliding layers: mlx-lm's RotatingKVCache, refused by the backend's generation
        with pytest.raises(MlxtuneError, match="plain KV caches only"):
            mb.generate(prompts, 16, temperature=0.0, adapter=False)
        row["gen"] = "MLX refuses (sliding-window cache)"
        gen = [[], []]
    else:
        gen = [b.generate(prompts, 16, temperature=0.0, adapter=False) for b in (tb, mb)]
        row["gen"] = "equal" if gen[0] == gen[1] else "DIFFER"
    assert logit_dev <= 1e-4 and dev <= 1e-5 and gen[0] == gen[1], row
    from backends.torch_peft import CHUNKED_HEAD_TYPES  # the torch backend's prompt/prefix families

    if model_type not in CHUNKED_HEAD_TYPES:
        row["virtual"] = "torch backend refuses"
        return
    vdev = []
    for method in ("prompt", "prefix"):
        vr = recipe(model_dir, targets, method=method, num_virtual_tokens=4)
        if method == "prompt" and model_type in NO_INPUT_EMBEDDINGS:  # refused by the mlx backend, naming why
            with pytest.raises(MlxtuneError, match="takes no input embeddings"):
                load_backend_with_adapter("mlx", model_dir, vr)
            vdev.append(None)
            continue
        vdev.append(three_steps(model_dir, vr)[0])
    row["virtual"] = " / ".join("MLX refuses" if d is None else f"{d:.1e}" for d in vdev)
    assert max(d for d in vdev if d is not None) <= 1e-5, row


def _recipe_file(tmp_path, model_dir, targets) -> str:
    (tmp_path / "train.jsonl").write_text('{"prompt": "say hello", "completion": "hello world"}\n' * 8)
    (tmp_path / "r.toml").write_text(f'[model]\npath = "{model_dir}"\n\n[adapter]\ntarget_modules = {targets!r}\n\n'
                                     '[data]\ntrain = "train.jsonl"\nformat = "prompt_completion"\n')
    return str(tmp_path / "r.toml")


@pytest.mark.parametrize("name", ["gemma3 (2 layers < pattern 6)", "gpt2", "granite", "llama"])
def test_validate_and_plan_agree_with_run(name, tok_dir, tmp_path):
    """`validate --backend mlx` names the reason the mlx backend's load would give (the same
    function), `ok` where run takes the model; `plan` reads any decoder's sizes (GPT-2 was a
    KeyError traceback)."""
    from click.testing import CliRunner

    from mlxtune.cli.main import cli

    model_type, overrides, targets, refusal = ROWS[name]
    build(tmp_path / "model", model_type, overrides, tok_dir)
    recipe_path = _recipe_file(tmp_path, tmp_path / "model", targets)
    res = CliRunner().invoke(cli, ["validate", recipe_path, "--backend", "mlx"])
    if refusal:
        assert res.exit_code == 2 and refusal in res.output and "use --backend torch" in res.output, res.output
        assert "Traceback" not in res.output
    else:
        assert res.exit_code == 0 and ": ok (" in res.output, res.output
    plan = CliRunner().invoke(cli, ["plan", recipe_path, "--backend", "torch", "--budget", "16GB"])
    assert plan.exit_code == 0, plan.output
    plan = CliRunner().invoke(cli, ["plan", recipe_path, "--backend", "mlx", "--budget", "16GB"])
    assert plan.exit_code == (1 if refusal else 0), plan.output
    assert ("the mlx backend refuses this model" in plan.output) == bool(refusal), plan.output


def test_gpt2_trains_on_torch(tok_dir, tmp_path):
    """GPT-2 (Conv1D projections, n_layer/n_embd sizes) trains on the torch backend: its loss falls."""
    model_type, overrides, targets, _ = ROWS["gpt2"]
    build(tmp_path, model_type, overrides, tok_dir)
    r = recipe(tmp_path, ["c_attn", "c_proj", "c_fc"])
    b = load_backend_with_adapter("torch", tmp_path, r)
    b.setup_optimizer(r)
    t, m = ragged_batches(3, 1, VOCAB[0])[0]
    losses = [b.train_step(t, m, int(m[:, 1:].sum()), True, 3e-2) for _ in range(4)]
    assert losses[-1] < losses[0]
