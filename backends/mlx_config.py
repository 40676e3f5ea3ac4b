"""mlx-lm's model config from transformers' reading of ``config.json`` (the MLX backend's "same
model" rule, see ``backends/apple_mlx.py``): field by field, checked after the model is built,
and refused for architectures and rope types not checked against transformers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxtune.errors import MlxtuneError
from mlxtune.models.gguf_base import stated_quantization
from mlxtune.models.source import read_config

# model_type -> fields mlx-lm's ModelArgs reads that must equal transformers' values.
_COMMON = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": _COMMON + ("head_dim", "attention_bias", "mlp_bias"),
    "qwen2": _COMMON,
    "qwen3": _COMMON + ("head_dim",),
}
# rope types whose mlx-lm implementation matches transformers' (checked by the tests).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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


def _rope(hf: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling in mlx-lm's format or None) as transformers reads them."""
    rp = getattr(hf, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        params = dict(rp)
    else:  # transformers 4 layout
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(hf, "rope_theta", None)
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
    return float(theta), params


def mlx_model_config(model_dir: Path) -> tuple[str, dict[str, Any]]:
    """(model_type, overrides for mlx-lm's ModelArgs) so that mlx-lm builds the model exactly
    as transformers reads ``config.json``. Raises MlxtuneError for anything not supported."""
    raw_path = Path(model_dir) / "config.json"
    if not raw_path.is_file():
        raise MlxtuneError(f"{model_dir}: no config.json (expected a Hugging Face model folder)")
    raw = read_config(model_dir)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise MlxtuneError(
            f"{raw_path}: model_type {model_type!r} is not supported by mlxtune's mlx backend "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}; each one is checked against "
            "transformers' logits in the test suite); use --backend torch"
        )
    if "quantization_config" in raw and "quantization" not in raw:  # mlx-lm writes both; HF formats (GPTQ, AWQ, bnb) only the second
        method = stated_quantization(raw, model_dir)  # None for a GGUF-converted folder of plain floats (mlx-lm ignores that method)
        if method is not None:
            raise MlxtuneError(f"{raw_path}: a {method}-quantized checkpoint cannot be trained by the mlx backend; name the "
                               "unquantized model and set model.quantize_bits (quantized at load), or an mlx-lm quantized folder")
    hf = _hf_config(model_dir)
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise MlxtuneError(f"{raw_path}: hidden_act {act!r} is not supported by the mlx backend (silu only)")
    layer_types = getattr(hf, "layer_types", None)
    if getattr(hf, "use_sliding_window", False) or (layer_types and any(t != "full_attention" for t in layer_types)):
        raise MlxtuneError(f"{raw_path}: sliding-window attention is not supported by the mlx backend yet")
    cfg: dict[str, Any] = {"model_type": model_type}
    for name in SUPPORTED_ARCHITECTURES[model_type]:
        value = getattr(hf, name, None)
        if name == "head_dim" and value is None:
            value = hf.hidden_size // hf.num_attention_heads
        if name == "num_key_value_heads" and value is None:
            value = hf.num_attention_heads
        if value is None:
            raise MlxtuneError(f"{raw_path}: transformers reads no value for {name!r}")
        cfg[name] = value
    if model_type == "qwen2":
        hd = getattr(hf, "head_dim", None)
        if hd is not None and hd != hf.hidden_size // hf.num_attention_heads:
            raise MlxtuneError(f"{raw_path}: head_dim {hd} != hidden_size / num_attention_heads, not supported for qwen2 by mlx-lm")
    if model_type == "qwen3" and getattr(hf, "attention_bias", False):
        raise MlxtuneError(f"{raw_path}: qwen3 with attention_bias is not supported by mlx-lm")
    if model_type == "llama" and getattr(hf, "pretraining_tp", 1) not in (1, None):
        raise MlxtuneError(f"{raw_path}: pretraining_tp != 1 is not supported")
    theta, scaling = _rope(hf)
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = scaling
    if model_type in ("llama", "qwen2"):
        cfg["rope_traditional"] = False
    if model_type == "llama":
        cfg["layer_types"] = None
        cfg["sliding_window"] = None
    if model_type == "qwen3":
        cfg["rope_parameters"] = None
    return model_type, cfg


def _check_model_args(args: Any, expected: dict[str, Any], where: Path) -> None:
    bad = []
    for name, want in expected.items():
        if name in ("layer_types", "rope_parameters"):
            continue
        have = getattr(args, name, "<absent>")
        if isinstance(want, float) or isinstance(have, float):
            ok = isinstance(have, (int, float)) and math.isclose(float(have), float(want), rel_tol=1e-9)
        else:
            ok = have == want
        if not ok:
            bad.append(f"{name}: mlx-lm has {have!r}, transformers reads {want!r}")
    if bad:
        raise MlxtuneError(f"{where}: mlx-lm and transformers read the model config differently: " + "; ".join(bad))
