"""LoRA and DoRA on the torch backend: peft's LoRA layers (DoRA is peft's ``use_dora``; QLoRA is
LoRA on a base that ``backends/torch_peft.py`` loaded quantized).

DoRA's magnitude crosses the backend boundary as ``<module>.lora_magnitude``. The files are
PEFT's (``adapter_model.safetensors`` + ``adapter_config.json``); :meth:`LoraTorch.load` also
reads mlx-lm's ``adapters.safetensors`` (see :func:`mlxtune.adapters.lora.read_adapter`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlxtune.adapters.lora import MAGNITUDE, MLX_DIR, LoraSpec, check_weight_keys, load_lora_folder, write_mlx_lm_or_say_why

from .torch_adapter import Decode, cached_decode, real_tokens

PEFT_PREFIX = "base_model.model."


class LoraTorch:
    """The LoRA (or DoRA) layers of a PEFT model (the :class:`~backends.torch_adapter.TorchAdapter` interface)."""

    def __init__(self, peft_model: Any, adapter: Any, device: torch.device) -> None:
        self.model, self.section, self.device = peft_model, adapter, device  # section: the recipe's [adapter]
        self.dora = adapter.method == "dora"
        self.body = peft_model.get_base_model().base_model  # the decoder without the head

    @classmethod
    def peft_config(cls, base: Any, adapter: Any, layers: list[int]) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=list(adapter.target_modules),
            layers_to_transform=None if len(layers) == base.config.num_hidden_layers else layers, bias="none",
            task_type="CAUSAL_LM", use_dora=adapter.method == "dora",
        )

    @classmethod
    def attach(cls, peft_model: Any, adapter: Any, chunked: bool, device: torch.device) -> LoraTorch:
        return cls(peft_model, adapter, device)

    def modules(self) -> dict[str, torch.nn.Module]:
        """Module path (as in the Hugging Face model) -> peft's LoRA layer."""
        from peft.tuners.lora import LoraLayer

        return {name.removeprefix(PEFT_PREFIX): m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    # -- weights --------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Module path -> (in, out)."""
        return {n: (m.in_features, m.out_features) for n, m in self.modules().items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """LoRA A/B (and DoRA magnitudes); DoRA without magnitudes initialises them as peft does."""
        from peft.utils.integrations import dequantize_module_weight

        modules = self.modules()
        has_mag = check_weight_keys(weights, modules, self.dora)
        with torch.no_grad():
            for name, m in modules.items():
                m.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(weights[f"{name}.lora_A"], dtype=np.float32)))
                m.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(weights[f"{name}.lora_B"], dtype=np.float32)))
                if not self.dora:
                    continue
                mag = m.lora_magnitude_vector["default"].weight
                if has_mag:
                    mag.copy_(torch.from_numpy(np.asarray(weights[f"{name}.{MAGNITUDE}"], dtype=np.float32)))
                else:  # row norms of W + scale * B @ A (peft's DoraLinearLayer.update_layer, in place)
                    w = dequantize_module_weight(m.get_base_layer()).float()
                    delta = m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()
                    mag.copy_(torch.linalg.norm(w + m.scaling["default"] * delta, dim=1))

    def get_weights(self) -> dict[str, np.ndarray]:
        out = {}  # copies: on CPU in fp32, .numpy() would share memory with the live parameters
        for name, m in self.modules().items():
            out[f"{name}.lora_A"] = m.lora_A["default"].weight.detach().float().cpu().numpy().copy()
            out[f"{name}.lora_B"] = m.lora_B["default"].weight.detach().float().cpu().numpy().copy()
            if self.dora:
                out[f"{name}.{MAGNITUDE}"] = m.lora_magnitude_vector["default"].weight.detach().float().cpu().numpy().copy()
        return out

    # -- files ----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """PEFT format: adapter_model.safetensors + adapter_config.json; and mlx-lm's in ``path/mlx``
        (or ``path/mlx/WHY_NOT.txt``: :func:`mlxtune.adapters.lora.write_mlx_lm_or_say_why`)."""
        self.model.save_pretrained(str(path), safe_serialization=True)
        a, cfg = self.section, self.model.config
        spec = LoraSpec(a.rank, a.alpha, a.dropout, self.dora, list(a.target_modules), cfg.num_hidden_layers,
                        str(self.model.peft_config["default"].base_model_name_or_path or ""), {"model_type": cfg.model_type})
        write_mlx_lm_or_say_why(Path(path) / MLX_DIR, self.get_weights(), spec)

    def load(self, path: Path) -> None:
        """An adapter folder in PEFT's format (as :meth:`save` writes it) or in mlx-lm's
        (``adapters.safetensors``, as the MLX backend or ``mlx_lm.lora`` writes it), LoRA or DoRA."""
        from safetensors.torch import load_file

        self.set_weights(load_lora_folder(path, self.section, self.modules(),
                                          lambda f: {k: v.float().numpy() for k, v in load_file(str(f)).items()}))

    # -- forward ----------------------------------------------------------------------
    def disabled(self) -> AbstractContextManager[None]:
        """The base model: peft's LoRA layers bypassed, meanwhile."""
        return self.model.disable_adapter()

    def hidden(self, tok: torch.Tensor) -> torch.Tensor:
        return self.body(input_ids=tok).last_hidden_state

    @torch.no_grad()
    def generate(self, ids: np.ndarray, padding: np.ndarray, decode: Decode) -> list[list[int]]:
        """Left padding is invisible to a row: the attention mask hides the pads and position ids
        count only real tokens, as in transformers' own ``generate``."""
        from transformers import DynamicCache

        attn = real_tokens(ids, padding, self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        tok = torch.from_numpy(ids).long().to(self.device)
        return cached_decode(self.model, cache, attn, pos, {"input_ids": tok}, self.device, decode)
