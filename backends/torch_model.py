"""Loading the base model of the torch backend: the device, the transformers model (quantized with
bitsandbytes on CUDA when the recipe asks: 4 bits NF4 with double quantization and bfloat16
compute, or 8 bits LLM.int8, prepared with peft's ``prepare_model_for_kbit_training``), and the
PEFT model around it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from mlxtune.errors import MlxtuneError
from mlxtune.models.quantization import base_bits, torch_problem
from mlxtune.recipe.schema import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MlxtuneError('model.device = "cuda" but torch sees no CUDA device; use "auto" or "cpu"')
    if name == "mps" and not torch.backends.mps.is_available():
        raise MlxtuneError('model.device = "mps" but MPS is not available; use "auto" or "cpu"')
    return torch.device(name)


def check_device(recipe: Recipe, device: torch.device) -> None:
    """Refuse ``train.autocast`` where the device has no bfloat16 autocast."""
    if recipe.train.autocast != "off" and (device.type == "mps" or (device.type == "cuda" and not torch.cuda.is_bf16_supported())):
        raise MlxtuneError(f'train.autocast = "{recipe.train.autocast}": this {device.type} device has no bfloat16 autocast; set train.autocast = "off"')


def check_model(model_dir: Path, recipe: Recipe, device: torch.device) -> int:
    """Refuse a base this device cannot load, before loading it; returns its bits (0: unquantized)."""
    if "quantization" in json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")):
        raise MlxtuneError(f"{model_dir}: an MLX-quantized model folder (mlx-lm's packed weights), which torch cannot load; "
                           "use --backend mlx, or the unquantized model with model.quantize_bits")
    bits = base_bits(recipe)
    problem = torch_problem(recipe, device.type)
    if problem:
        raise MlxtuneError(problem)
    return bits


def load_base(model_dir: Path, recipe: Recipe, dtype: torch.dtype, device: torch.device, bits: int) -> Any:
    """The transformers model, quantized with bitsandbytes when ``bits``, its linear layers checked
    against ``adapter.target_modules``."""
    from transformers import AutoModelForCausalLM

    quant: dict = {}
    if bits:
        from transformers import BitsAndBytesConfig

        qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        quant = {"quantization_config": qc, "device_map": {"": device.index or 0}}
    kw = dict(dtype=dtype, trust_remote_code=recipe.model.trust_remote_code, **quant)
    try:
        base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa", **kw)
    except ValueError as e:  # architectures without an SDPA path (Gemma 2's softcapped attention)
        if "sdpa" not in str(e).lower() and "scaled_dot_product" not in str(e).lower():
            raise
        base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", **kw)
    if bits:
        from peft import prepare_model_for_kbit_training

        # freezes the base and makes the unquantized rest float32; checkpointing is set below
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    base.config.use_cache = False
    # prompt/prefix tuning wraps no layer: its (default) target_modules are not checked
    targets = [] if recipe.adapter.method in ("prompt", "prefix") else recipe.adapter.target_modules
    # bnb's layers subclass Linear; GPT-2's projections are transformers' Conv1D (peft adapts both)
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                           if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise MlxtuneError(f"adapter.target_modules: {missing} not found in {model_dir.name}; its linear layers are: {', '.join(linear_names)}")
    return base


def attach_peft(base: Any, config: Any, checkpointing: bool) -> Any:
    """``get_peft_model(base, config)``, with gradient checkpointing switched on first if asked."""
    from peft import get_peft_model

    if checkpointing:
        if hasattr(base, "activation_checkpointing_enable"):  # the newer transformers 5 name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, config)
