"""The quantized base a recipe asks for, how each backend builds it, and whether this machine can.

No framework is imported at module level: `mlxtune validate` and `mlxtune plan` use this on any
machine. The backends use the same functions, so the words in validate, plan, the run's error and
the run's report are one set.

- MLX: affine quantization (``mlx.nn.quantize``) of every linear layer, the embedding and the
  head at load, ``bits`` per weight and a scale and an offset per ``group_size`` weights, on any
  machine (Metal or CPU). A model folder already quantized by mlx-lm is used as it is.
- torch: bitsandbytes on a CUDA GPU only: 4 bits = NF4 with double quantization and bfloat16
  compute (the QLoRA paper's setup, seed 004), 8 bits = LLM.int8; the rest of the model is
  prepared with peft's ``prepare_model_for_kbit_training`` (which keeps it in float32).
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlxtune.recipe.schema import Recipe


def base_bits(recipe: Recipe) -> int:
    """Bits per frozen base weight: ``model.quantize_bits``, where 0 means 4 for ``qlora``."""
    return recipe.model.quantize_bits or (4 if recipe.adapter.method == "qlora" else 0)


def mlx_label(bits: int, group_size: int, mode: str = "affine") -> str:
    return f"mlx {mode} {bits}-bit, group {group_size}" if bits else "none"


def torch_label(bits: int) -> str:
    if bits == 4:
        return "bitsandbytes nf4, double quant, bf16 compute"
    if bits == 8:
        return "bitsandbytes int8 (LLM.int8)"
    return "none"


def _what(recipe: Recipe) -> str:
    if recipe.adapter.method == "qlora" and not recipe.model.quantize_bits:
        return 'adapter.method = "qlora" (a 4-bit base)'
    return f"model.quantize_bits = {recipe.model.quantize_bits}"


def cuda_visible() -> bool:
    """Whether torch would find a CUDA GPU, cheaply: no ``nvidia-smi`` means no (torch is not
    imported); otherwise torch is imported and asked."""
    if shutil.which("nvidia-smi") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def torch_problem(recipe: Recipe, device: str | None = None) -> str | None:
    """Why the torch backend cannot build the recipe's quantized base here, or None.

    ``device`` is the torch device type the run uses ("cuda", "cpu", "mps"); None works it out
    from ``model.device`` and :func:`cuda_visible`."""
    bits = base_bits(recipe)
    if not bits:
        return None
    if device is None:
        requested = recipe.model.device
        device = requested if requested != "auto" else ("cuda" if cuda_visible() else "cpu")
    if device != "cuda":
        reason = (f'model.device = "{recipe.model.device}"' if recipe.model.device not in ("auto", "cuda")
                  else "this machine has no CUDA GPU that torch can use")
        return (f"{_what(recipe)}: the torch backend quantizes the base with bitsandbytes, which needs a CUDA GPU, "
                f"and {reason}; use --backend mlx (quantizes on any machine), a CUDA machine, or "
                'model.quantize_bits = 0 with adapter.method = "lora" or "dora" (a full-precision base)')
    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"{_what(recipe)}: the torch backend needs bitsandbytes for a quantized base, which is not installed: "
                "pip install 'mlxtune[cuda]' (or use --backend mlx)")
    return None
