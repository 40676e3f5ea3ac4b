"""The frozen base model of the MLX backend: built by mlx-lm from the config that
``backends/mlx_config.py`` translates, in the recipe's dtype, quantized as the recipe and the
model folder say, and gradient checkpointing of its blocks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import mlx.nn as nn

from mlxtune.errors import MlxtuneError
from mlxtune.models.quantization import base_bits, mlx_label
from mlxtune.models.source import read_config

from .mlx_config import _check_model_args, mlx_model_config

if TYPE_CHECKING:
    from mlxtune.recipe.schema import Recipe


def load_base(model_dir: Path, recipe: Recipe) -> tuple[nn.Module, str, dict[str, Any], str]:
    """(the frozen model, its model_type, config.json as :func:`read_config` reads it, the
    quantization as ``describe()`` reports it). Seeds MLX's generator with the recipe's seed
    before anything is drawn, and resets the peak memory count."""
    from mlx_lm.utils import load_model

    model_type, cfg = mlx_model_config(model_dir)
    if not list(model_dir.glob("model*.safetensors")):
        raise MlxtuneError(f"{model_dir}: no model*.safetensors weights (the mlx backend loads safetensors only)")
    mx.random.seed(recipe.train.seed)
    mx.reset_peak_memory()
    try:
        model, _ = load_model(model_dir, model_config=cfg, strict=True)
    except (ValueError, KeyError) as e:
        raise MlxtuneError(f"{model_dir}: mlx-lm cannot load the weights: {e}") from None
    _check_model_args(model.args, cfg, model_dir)
    check_prompt_tuning(model, model_type, recipe)
    if not hasattr(model.args, "tie_word_embeddings"):  # Gemma: tied unless the folder has lm_head (mlx-lm drops it)
        model.args.tie_word_embeddings = getattr(model, "lm_head", None) is None
    model.set_dtype(getattr(mx, recipe.model.dtype))  # the recipe's names are mx dtype names
    config = read_config(model_dir)
    quantization = _quantization(model, config.get("quantization"), recipe, model_dir)
    model.freeze()
    return model, model_type, config, quantization


def check_prompt_tuning(model: nn.Module, model_type: str, recipe: Recipe) -> None:
    """Prompt tuning feeds embeddings to the body (mlx-lm's ``input_embeddings``), which some of
    mlx-lm's architectures (phi3, starcoder2, olmo2) do not take."""
    import inspect

    if recipe.adapter.method == "prompt" and "input_embeddings" not in inspect.signature(model.model.__call__).parameters:
        raise MlxtuneError(f'adapter.method = "prompt": mlx-lm\'s {model_type} takes no input embeddings, so the mlx backend '
                           'cannot prepend virtual tokens; use adapter.method = "prefix" or --backend torch')


def _quantization(model: nn.Module, found: dict[str, Any] | None, recipe: Recipe, model_dir: Path) -> str:
    """Quantize the base as the recipe asks (unless the folder is quantized already, ``found``:
    config.json's "quantization"); returns what describe() says about it."""
    bits, group = base_bits(recipe), recipe.model.quantize_group_size
    if found:  # quantized by mlx-lm: mlx-lm's loader built QuantizedLinear layers
        fb, fg, mode = found.get("bits"), found.get("group_size"), found.get("mode", "affine")
        if bits and (bits, group) != (fb, fg):
            raise MlxtuneError(f"{model_dir}/config.json: the model is already quantized ({mode} {fb}-bit, group {fg}) "
                               f"but the recipe asks for {bits}-bit, group {group}; set model.quantize_bits = {fb} and "
                               f"model.quantize_group_size = {fg}, or name the unquantized model")
        return mlx_label(fb, fg, mode) + " (already quantized in the model folder)"
    if bits:
        _quantize_base(model, bits, group, model_dir)
        return mlx_label(bits, group) + " (quantized at load)"
    return "none"


def _quantize_base(model: nn.Module, bits: int, group_size: int, where: Path) -> None:
    """Affine quantization of every layer that has ``to_quantized`` (linear layers, embedding,
    head: what mlxtune/planning/memory.py counts), refusing layers whose input size is not a multiple of
    the group size rather than leaving them in full precision unannounced."""
    layers = [(p, m) for p, m in model.named_modules() if hasattr(m, "to_quantized") and "weight" in m]
    bad = sorted({int(m.weight.shape[-1]) for _, m in layers if m.weight.shape[-1] % group_size})
    if bad:
        raise MlxtuneError(f"{where}: model.quantize_group_size = {group_size} does not divide the input size {bad[0]} of "
                           f"some layers (e.g. {next(p for p, m in layers if m.weight.shape[-1] == bad[0])}); "
                           f"use a group size that divides {', '.join(map(str, bad))} (32 or 64)")
    nn.quantize(model, group_size=group_size, bits=bits, mode="affine")


_CHECKPOINTED: dict[type, type] = {}


def _checkpoint_blocks(blocks: list[nn.Module]) -> None:
    """Gradient checkpointing: each block's call runs under ``mx.checkpoint``, so its activations
    are recomputed during backward instead of kept. Done by giving each block a subclass of its
    own class (parameter names unchanged); mlx-lm's ``grad_checkpoint`` patches the class itself,
    which would change every model of that class in the process."""
    for block in blocks:
        cls = type(block)
        if cls in _CHECKPOINTED.values():
            continue
        if cls not in _CHECKPOINTED:
            call = cls.__call__

            def checkpointed(self, *args, _call=call, **kwargs):
                def inner(params, *a, **kw):
                    self.update(params)
                    return _call(self, *a, **kw)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(cls.__name__ + "Checkpointed", (cls,), {"__call__": checkpointed})
        block.__class__ = _CHECKPOINTED[cls]
