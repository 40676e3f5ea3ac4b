"""The torch backend's adapter objects: one per method, one small interface.

As peft's ``LoraVariant`` or torchtune's ``AdapterModule``: :class:`TorchBackend
<backends.torch_peft.TorchBackend>` picks the adapter's class once, in ``load``, and from then
on talks to ``self.adapter`` only, the same way whatever the method:

- :class:`backends.torch_lora.LoraTorch`: LoRA and DoRA as peft's LoRA layers (QLoRA is LoRA on
  a quantized base);
- :class:`backends.torch_virtual.VirtualTorch`: prompt and prefix tuning (PEFT's prompt encoder).

The weights cross as the backend boundary's numpy dict (see ``backends.Backend``); files are PEFT's.
The MLX backend's adapter objects use the same names for the same methods (shapes, set_weights,
get_weights, save, load, disabled).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

# decode(first logits, step) -> new token ids per row: the backend's closure over
# mlxtune.evaluation.generation.decode_loop with the caller's sampling settings
Decode = Callable[[np.ndarray, Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]], list[list[int]]]


class TorchAdapter(Protocol):
    """An adapter attached to a PEFT model, on one device."""

    @classmethod
    def peft_config(cls, base: Any, adapter: Any, layers: list[int]) -> Any:
        """The PEFT config that ``get_peft_model`` attaches to the transformers model ``base``
        for the recipe's ``adapter`` section in the blocks ``layers``."""

    @classmethod
    def attach(cls, peft_model: Any, adapter: Any, chunked: bool, device: torch.device) -> TorchAdapter:
        """The adapter object around ``get_peft_model``'s result; ``chunked``: whether the loss
        runs the body and a plain linear head apart (refused by methods that need it)."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of what crosses the boundary: LoRA module path -> (in, out); prompt/prefix
        weight name -> shape (``mlxtune.adapters.virtual.VirtualSpec.shapes``)."""

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Copy the boundary's float32 weights into the live parameters (ValueError on other keys or shapes)."""

    def get_weights(self) -> dict[str, np.ndarray]:
        """The live parameters as float32 numpy copies, in the boundary's names."""

    def save(self, path: Path) -> None:
        """Write the adapter folder ``path`` in PEFT's format."""

    def load(self, path: Path) -> None:
        """Read an adapter folder (refused unless it is the recipe's adapter) into the live parameters."""

    def disabled(self) -> AbstractContextManager[None]:
        """Context manager: the base model, without the adapter, meanwhile."""

    def hidden(self, tok: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, d] of the real tokens ``tok`` [B, T] (no virtual positions)."""

    def generate(self, ids: np.ndarray, padding: np.ndarray, decode: Decode) -> list[list[int]]:
        """Prefill the left-padded ``ids`` (``padding`` pads per row) with a KV cache, then hand
        the first logits and the per-token step to ``decode``."""


def cached_decode(model: Any, cache: Any, attn: torch.Tensor, pos: torch.Tensor, inputs: dict[str, torch.Tensor],
                  device: torch.device, decode: Decode) -> list[list[int]]:
    """The prefill (``inputs``: ``input_ids`` or ``inputs_embeds``, with the attention mask
    ``attn`` and position ids ``pos``) and the one-token steps of ``model`` with its KV ``cache``;
    the step drops finished rows from the cache and the mask."""

    def forward(attn: torch.Tensor, pos: torch.Tensor, **inputs: Any) -> np.ndarray:
        out = model(attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1, **inputs)
        return out.logits[:, -1].float().cpu().numpy()

    state = {"attn": attn, "pos": pos[:, -1:]}

    def step(tokens: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        if keep is not None:  # drop finished rows from the cache and the mask
            idx = torch.from_numpy(keep).to(device)
            cache.batch_select_indices(idx)
            state["attn"], state["pos"] = state["attn"][idx], state["pos"][idx]
        state["attn"] = torch.cat([state["attn"], state["attn"].new_ones((len(tokens), 1))], dim=1)
        state["pos"] = state["pos"] + 1
        return forward(state["attn"], state["pos"], input_ids=torch.from_numpy(tokens).long().to(device)[:, None])

    first = forward(attn, pos, **inputs)
    return decode(first, step)


def real_tokens(ids: np.ndarray, padding: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 [B, T]: 1 on a row's real tokens, 0 on its left padding."""
    return torch.from_numpy((np.arange(ids.shape[1])[None, :] >= padding[:, None]).astype(np.int64)).to(device)
