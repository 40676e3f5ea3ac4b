"""Prompt and prefix tuning on the torch backend, through PEFT.

The adapter is PEFT's own (``PromptTuningConfig`` / ``PrefixTuningConfig`` + ``get_peft_model``),
so the saved files are PEFT's. The loss does not go through ``PeftModel.forward`` (which would
compute B x T x V logits): :meth:`VirtualTorch.hidden` builds the same inputs PEFT's forward
builds and runs the model body, returning the hidden states of the real tokens only, so the
core's masks (one per real token) and the chunked head apply unchanged and a virtual position
never carries loss. ``tests/test_virtual_tokens.py`` checks the result against PEFT's forward
with labels.

What PEFT's forward does, and so this module (no attention mask, right padding):

- prompt: ``inputs_embeds = cat(prompt_encoder.embedding, embed(tokens))``; position ids count
  from 0 over the whole sequence, so the first real token sits at position n_virtual;
- prefix: the prefix keys/values (never rotated) are a ``DynamicCache`` of n_virtual entries per
  layer; the real tokens' positions start at n_virtual (transformers counts the cache).

Generation (``generate``) keeps those positions with left padding: a row's real tokens start at
n_virtual whatever its padding, and the attention mask hides the pads, never the virtual tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mlxtune.errors import MlxtuneError
from mlxtune.adapters.virtual import VirtualSpec, load_virtual, save_virtual

from .torch_adapter import Decode, cached_decode, real_tokens


def peft_config(spec: VirtualSpec) -> Any:
    from peft import PrefixTuningConfig, PromptTuningConfig

    if spec.method == "prompt":
        # the values come from the core (set_adapter_weights); PEFT's own init is replaced
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.n_virtual, prompt_tuning_init="RANDOM")
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.n_virtual, prefix_projection=spec.projection,
                              encoder_hidden_size=spec.mlp_hidden or None)


class VirtualTorch:
    """The prompt encoder of a PEFT prompt-learning model, and the forward passes around it (the
    :class:`~backends.torch_adapter.TorchAdapter` interface)."""

    def __init__(self, peft_model: Any, spec: VirtualSpec, device: torch.device) -> None:
        self.peft_model, self.spec, self.device = peft_model, spec, device
        self.encoder = peft_model.prompt_encoder["default"]
        self.base = peft_model.get_base_model()
        self.body = self.base.base_model  # the decoder without the head
        self.enabled = True
        have = {k: tuple(v.shape) for k, v in self.encoder.state_dict().items()}
        if have != spec.shapes():  # PEFT and mlxtune/adapters/virtual.py must agree on the layout
            raise MlxtuneError(f"PEFT's {spec.method} encoder {have} differs from mlxtune's layout {spec.shapes()}")

    @classmethod
    def peft_config(cls, base: Any, adapter: Any, layers: list[int]) -> Any:
        return peft_config(VirtualSpec.from_config(base.config.to_dict(), adapter))

    @classmethod
    def attach(cls, peft_model: Any, adapter: Any, chunked: bool, device: torch.device) -> VirtualTorch:
        base = peft_model.get_base_model()
        spec = VirtualSpec.from_config(base.config.to_dict(), adapter)
        check_supported(base, spec, chunked)
        return cls(peft_model, spec, device)

    # -- weights --------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight name -> shape (mlxtune/adapters/virtual.py)."""
        return self.spec.shapes()

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.spec.check_weights(weights)
        state = self.encoder.state_dict()
        with torch.no_grad():
            for k, v in weights.items():
                state[k].copy_(torch.from_numpy(np.asarray(v, dtype=np.float32)))

    def get_weights(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy().copy() for k, v in self.encoder.state_dict().items()}

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model: no virtual tokens, meanwhile."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    # -- forward ----------------------------------------------------------------------
    def _prompts(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        return self.peft_model.get_prompt(batch_size=batch).to(dtype)

    def hidden(self, tok: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, d] of the real tokens, as PEFT's forward computes them."""
        if not self.enabled:
            return self.body(input_ids=tok).last_hidden_state
        n = self.spec.n_virtual
        if self.spec.method == "prompt":
            emb = self.base.get_input_embeddings()(tok)
            embeds = torch.cat([self._prompts(tok.shape[0], emb.dtype), emb], dim=1)
            return self.body(inputs_embeds=embeds).last_hidden_state[:, n:]
        cache = self.peft_model.get_prompt(batch_size=tok.shape[0])
        return self.body(input_ids=tok, past_key_values=cache).last_hidden_state

    # -- files ------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """PEFT's own files; with a projection also the MLP, which PEFT does not save."""
        self.peft_model.save_pretrained(str(path), safe_serialization=True)
        save_virtual(path, self.spec, self.get_weights(), "", peft_files=False)

    def load(self, path: Path) -> None:
        self.set_weights(load_virtual(path, self.spec))

    # -- generation -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, ids: np.ndarray, padding: np.ndarray, decode: Decode) -> list[list[int]]:
        """Prefill the left-padded ``ids`` behind the virtual tokens, then hand the per-token step
        to ``decode`` (the shared numpy loop). Positions: virtual tokens 0..n-1, a row's real
        tokens from n on, whatever its padding (as in training); pads are masked."""
        from transformers import DynamicCache

        device = self.device
        n = self.spec.n_virtual if self.enabled else 0
        tok = torch.from_numpy(ids).long().to(device)
        batch = tok.shape[0]
        real = real_tokens(ids, padding, device)
        attn = torch.cat([real.new_ones((batch, n)), real], dim=1)
        pos = n + (real.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {}
        if n and self.spec.method == "prompt":
            emb = self.base.get_input_embeddings()(tok)
            kwargs["inputs_embeds"] = torch.cat([self._prompts(batch, emb.dtype), emb], dim=1)
            pos = torch.cat([torch.arange(n, device=device).expand(batch, n), pos], dim=1)
            cache = DynamicCache(config=self.base.config)
        elif n:
            kwargs["input_ids"] = tok
            cache = self.peft_model.get_prompt(batch_size=batch)
        else:
            kwargs["input_ids"] = tok
            cache = DynamicCache(config=self.base.config)
        return cached_decode(self.base, cache, attn, pos, kwargs, device, decode)


def check_supported(base: Any, spec: VirtualSpec, chunked: bool) -> None:
    if not chunked:
        raise MlxtuneError(f"adapter.method = \"{spec.method}\" on the torch backend needs a model whose head is a plain "
                           f"linear layer with no logit scaling or softcapping, checked by the parity matrix (llama, mistral, "
                           f"qwen2, qwen3, phi3, olmo2, smollm3, starcoder2, mixtral, qwen3_moe); this one is "
                           f"{base.config.model_type!r}: use adapter.method = \"lora\"")
