"""mlx-lm's model config from transformers' reading of ``config.json`` (the MLX backend's "same
model" rule, see ``backends/apple_mlx.py``).

One generic translation for every architecture: transformers' config object (``AutoConfig``)
is turned into the dict mlx-lm's ``ModelArgs.from_dict`` reads, with the features the two
stacks read differently handled here, in one place:

- rope: transformers 5 writes ``rope_parameters`` (per layer type for Gemma 3), mlx-lm 0.32
  reads ``rope_theta`` / ``rope_scaling`` and silently falls back to 10000 without them;
- sliding windows: ``layer_types`` (transformers) -> ``layer_types`` (mlx-lm's Llama/Mistral)
  or ``sliding_window_pattern`` (mlx-lm's Gemma 3);
- activations mlx-lm hard-codes per architecture, final-logit softcapping and logit scaling
  (applied by mlx-lm's ``Model.__call__``, which the backend's chunked loss does not call).

:func:`mlx_refusal` is THE answer to "does the mlx backend take this model": ``validate``,
``plan``, ``doctor`` and ``run`` (through :func:`mlx_model_config`) all ask it. Each refusal
names the feature the stacks disagree on. After the model is built, the fields are checked
again against mlx-lm's parsed args (:func:`_check_model_args`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxtune.errors import MlxtuneError
from mlxtune.models.gguf_base import stated_quantization
from mlxtune.models.source import read_config

# model_type -> the activation mlx-lm's implementation hard-codes (transformers' name for it).
# These are the architectures the parity matrix (tests/test_parity_matrix.py) checks against
# transformers: logits, LoRA steps and generation.
_ACTIVATION = {
    "llama": "silu", "mistral": "silu", "qwen2": "silu", "qwen3": "silu", "granite": "silu",
    "olmo2": "silu", "smollm3": "silu", "phi3": "silu", "mixtral": "silu", "qwen3_moe": "silu",
    "gemma2": "gelu_pytorch_tanh", "gemma3_text": "gelu_pytorch_tanh", "starcoder2": "gelu",
}
SUPPORTED_ARCHITECTURES = tuple(_ACTIVATION)
# Why an architecture mlx-lm implements is still refused (the block layout the adapters need).
_LAYOUT = {
    "gpt2": "its blocks are `h.N` with a fused `c_attn` projection and no `model.layers` / `embed_tokens`, "
            "the layout the mlx backend's adapters and loss are written for",
    "gemma3": "it is the multimodal Gemma 3 wrapper (text_config); use a text-only gemma3_text folder",
}
# rope types whose mlx-lm implementation matches transformers' (checked by the tests).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARGS_CHECKED = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "tie_word_embeddings", "rms_norm_eps",
                 "max_position_embeddings",
                 "attention_bias", "mlp_bias", "partial_rotary_factor", "embedding_multiplier",
                 "attention_multiplier", "residual_multiplier", "attn_logit_softcapping",
                 "query_pre_attn_scalar", "rope_local_base_freq", "sliding_window_pattern", "no_rope_layers")


def _hf_config(model_dir: Path) -> Any:
    try:
        from transformers import AutoConfig
    except ImportError:
        raise MlxtuneError(
            "the mlx backend reads the model config with transformers, which is not installed: "
            "pip install 'mlxtune[mlx]'"
        ) from None
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many kinds here
        raise MlxtuneError(f"{model_dir}/config.json: transformers cannot read it: {e}") from None


def _rope_params(hf: Any) -> dict[str, Any]:
    """transformers' rope parameters of the global (full-attention) layers, any layout."""
    rp = getattr(hf, "rope_parameters", None)
    if isinstance(rp, dict) and isinstance(rp.get("full_attention"), dict):  # per layer type (Gemma 3)
        return dict(rp["full_attention"])
    if isinstance(rp, dict) and "rope_theta" in rp:
        return dict(rp)
    params = dict(getattr(hf, "rope_scaling", None) or {})  # transformers 4 layout
    params["rope_theta"] = getattr(hf, "rope_theta", None)
    return params


def _rope(hf: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling in mlx-lm's format or None) as transformers reads them."""
    params = _rope_params(hf)
    theta = params.pop("rope_theta", None)
    if theta is None:
        raise MlxtuneError("the model config has no rope_theta (neither top level nor in rope_parameters)")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MlxtuneError(
            f"rope type {rope_type!r} is not supported by mlxtune's mlx backend yet "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}); use --backend torch"
        )
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    params.pop("type", None)
    params.pop("partial_rotary_factor", None)
    return float(theta), params


def _layer_types(hf: Any) -> list[str]:
    """Attention kind per layer; a window no sequence can exceed is full attention (except for
    Gemma 3, whose sliding layers also use another rope base)."""
    n, window = hf.num_hidden_layers, getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    if hf.model_type == "gemma3_text":
        return list(types or ["full_attention"] * n)
    if not window or window >= hf.max_position_embeddings:
        return ["full_attention"] * n
    if types:
        return list(types)
    if getattr(hf, "use_sliding_window", True):
        return ["sliding_attention"] * n  # Mistral: every layer, when sliding_window is set
    return ["full_attention"] * n


def _feature_refusal(kind: str, hf: Any) -> str | None:
    """The feature of this config the mlx backend cannot reproduce exactly, or None."""
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None)
    if act != _ACTIVATION[kind]:
        return f"activation {act!r} (mlx-lm's {kind} hard-codes {_ACTIVATION[kind]!r})"
    if getattr(hf, "final_logit_softcapping", None):
        return "final-logit softcapping (the backend's chunked loss and generation apply the head without it)"
    if kind == "granite" and getattr(hf, "logits_scaling", 1.0) != 1.0:
        return "logits_scaling != 1 (the backend's chunked loss and generation apply the head without it)"
    if getattr(hf, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp != 1"
    types = _layer_types(hf)
    window = getattr(hf, "sliding_window", None)
    if any(t != "full_attention" for t in types):
        if kind in ("llama", "mistral", "smollm3") and "full_attention" not in types:
            return f"sliding-window attention on every layer (window {window}; mlx-lm's llama needs a full-attention layer)"
        if kind in ("qwen2", "qwen3", "gemma2", "mixtral", "qwen3_moe", "starcoder2", "phi3", "olmo2", "granite"):
            return f"sliding-window attention (window {window} < max_position_embeddings; mlx-lm's {kind} has none)"
        if kind == "gemma3_text" and "full_attention" not in types:
            return (f"a Gemma 3 with fewer layers ({len(types)}) than its sliding-window pattern (mlx-lm's "
                    "gemma3_text needs a global-attention layer inside the model)")
        if kind == "gemma3_text" and _pattern(types) is None:
            return "an irregular sliding-window layer pattern (mlx-lm's gemma3_text needs every p-th layer global)"
    if kind == "gemma2" and (hf.num_key_value_heads or hf.num_attention_heads) != hf.num_attention_heads:
        return ("grouped-query attention (mlx-lm's gemma2 broadcasts the padding mask over the wrong axis in batched "
                "generation)")
    if kind == "qwen2":
        hd = getattr(hf, "head_dim", None)
        if hd is not None and hd != hf.hidden_size // hf.num_attention_heads:
            return "head_dim != hidden_size / num_attention_heads (mlx-lm's qwen2 derives it)"
    if kind in ("qwen3", "qwen3_moe") and getattr(hf, "attention_bias", False):
        return "qkv bias (mlx-lm's qwen3 has none)"
    return None


def _pattern(types: list[str]) -> int | None:
    """p such that layer i is global exactly when (i + 1) % p == 0 (mlx-lm's gemma3_text rule)."""
    if "full_attention" not in types:
        return None
    p = types.index("full_attention") + 1
    return p if all((t == "full_attention") == ((i + 1) % p == 0) for i, t in enumerate(types)) else None


def mlx_refusal(config: dict[str, Any], model_dir: Path | None = None) -> str | None:
    """Why the mlx backend refuses the model whose config.json is ``config``, naming the feature
    (None: it takes it). With ``model_dir`` the config is also read by transformers, as at load."""
    kind = config.get("model_type")
    if kind in _LAYOUT:
        return f"model_type {kind!r} is not supported by the mlx backend: {_LAYOUT[kind]}"
    if kind not in _ACTIVATION:
        return (f"model_type {kind!r} is not supported by the mlx backend (supported: {', '.join(_ACTIVATION)}; "
                "each is checked against transformers by the parity matrix)")
    if model_dir is None:
        return None
    hf = _hf_config(model_dir)
    try:
        _rope(hf)
    except MlxtuneError as e:
        return str(e)
    feature = _feature_refusal(kind, hf)
    return f"{kind}: {feature} is not supported by the mlx backend" if feature else None


def mlx_model_config(model_dir: Path) -> tuple[str, dict[str, Any]]:
    """(model_type, overrides for mlx-lm's ModelArgs) so that mlx-lm builds the model exactly
    as transformers reads ``config.json``. Raises MlxtuneError for anything not supported."""
    raw_path = Path(model_dir) / "config.json"
    if not raw_path.is_file():
        raise MlxtuneError(f"{model_dir}: no config.json (expected a Hugging Face model folder)")
    raw = read_config(model_dir)
    if "quantization_config" in raw and "quantization" not in raw:  # mlx-lm writes both; HF formats (GPTQ, AWQ, bnb) only the second
        method = stated_quantization(raw, model_dir)  # None for a GGUF-converted folder of plain floats (mlx-lm ignores that method)
        if method is not None:
            raise MlxtuneError(f"{raw_path}: a {method}-quantized checkpoint cannot be trained by the mlx backend; name the "
                               "unquantized model and set model.quantize_bits (quantized at load), or an mlx-lm quantized folder")
    reason = mlx_refusal(raw, Path(model_dir))
    if reason:
        raise MlxtuneError(f"{raw_path}: {reason}; use --backend torch")
    return raw["model_type"], _translate(_hf_config(model_dir))


def _translate(hf: Any) -> dict[str, Any]:
    """transformers' config object -> the dict mlx-lm's ``ModelArgs.from_dict`` reads (it keeps
    the fields its architecture declares and drops the rest)."""
    cfg = {k: v for k, v in hf.to_dict().items() if not k.startswith("_") and k not in ("rope_parameters", "text_config")}
    for alias, name in getattr(hf, "attribute_map", {}).items():  # mlx-lm may read the other name (num_experts)
        cfg.setdefault(alias, cfg.get(name))
    if getattr(hf, "head_dim", None) is None:
        cfg["head_dim"] = hf.hidden_size // hf.num_attention_heads
    if getattr(hf, "num_key_value_heads", None) is None:
        cfg["num_key_value_heads"] = hf.num_attention_heads
    theta, scaling = _rope(hf)
    cfg.update(rope_theta=theta, rope_scaling=scaling, rope_parameters=None, rope_traditional=False)
    # transformers 5 keeps partial rotary in the rope parameters; mlx-lm reads it top level
    cfg["partial_rotary_factor"] = _rope_params(hf).get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None))
    if hf.model_type == "gemma2" and not getattr(hf, "final_logit_softcapping", None):
        # mlx-lm's gemma2 always divides by the cap; tanh(x / 1e30) * 1e30 == x in float32
        cfg["final_logit_softcapping"] = 1e30
    types = _layer_types(hf)
    if hf.model_type == "gemma3_text":
        rp = getattr(hf, "rope_parameters", None) or {}
        local = (rp.get("sliding_attention") or {}).get("rope_theta", getattr(hf, "rope_local_base_freq", None))
        cfg.update(rope_local_base_freq=float(local), sliding_window_pattern=_pattern(types), layer_types=None)
    elif any(t != "full_attention" for t in types):
        cfg["layer_types"] = types
    else:
        cfg.update(layer_types=None, sliding_window=None)
    if hf.model_type == "starcoder2":
        cfg["norm_epsilon"] = hf.norm_epsilon
    return cfg


def _check_model_args(args: Any, expected: dict[str, Any], where: Path) -> None:
    """Every field mlx-lm parsed that transformers also reads must agree (the fields an
    architecture does not declare are skipped)."""
    bad = []
    for name in _ARGS_CHECKED:
        if name not in expected or not hasattr(args, name) or expected[name] is None:
            continue
        want, have = expected[name], getattr(args, name)
        if isinstance(want, float) or isinstance(have, float):
            ok = isinstance(have, (int, float)) and math.isclose(float(have), float(want), rel_tol=1e-9)
        else:
            ok = have == want
        if not ok:
            bad.append(f"{name}: mlx-lm has {have!r}, transformers reads {want!r}")
    if bad:
        raise MlxtuneError(f"{where}: mlx-lm and transformers read the model config differently: " + "; ".join(bad))
