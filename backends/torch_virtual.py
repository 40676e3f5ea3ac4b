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

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mlxtune.errors import MlxtuneError
from mlxtune.adapters.virtual import VirtualSpec, load_virtual, save_virtual


def peft_config(spec: VirtualSpec) -> Any:
    from peft import PrefixTuningConfig, PromptTuningConfig

    if spec.method == "prompt":
        # the values come from the core (set_adapter_weights); PEFT's own init is replaced
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.n_virtual, prompt_tuning_init="RANDOM")
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.n_virtual, prefix_projection=spec.projection,
                              encoder_hidden_size=spec.mlp_hidden or None)


class VirtualTorch:
    """The prompt encoder of a PEFT prompt-learning model, and the forward passes around it."""

    def __init__(self, peft_model: Any, spec: VirtualSpec) -> None:
        self.peft_model, self.spec = peft_model, spec
        self.encoder = peft_model.prompt_encoder["default"]
        self.base = peft_model.get_base_model()
        self.body = self.base.base_model  # the decoder without the head
        self.enabled = True
        have = {k: tuple(v.shape) for k, v in self.encoder.state_dict().items()}
        if have != spec.shapes():  # PEFT and mlxtune/adapters/virtual.py must agree on the layout
            raise MlxtuneError(f"PEFT's {spec.method} encoder {have} differs from mlxtune's layout {spec.shapes()}")

    # -- weights --------------------------------------------------------------------
    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        shapes = self.spec.shapes()
        if set(weights) != set(shapes):
            raise ValueError(f"{self.spec.method} weights {sorted(weights)} do not match {sorted(shapes)}")
        state = self.encoder.state_dict()
        with torch.no_grad():
            for k, v in weights.items():
                if tuple(v.shape) != shapes[k]:
                    raise ValueError(f"{k}: shape {v.shape} != {shapes[k]}")
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
    def generate(self, ids: np.ndarray, padding: np.ndarray, device: torch.device, max_tokens: int,
                 decode: Callable[[np.ndarray, Callable], list[list[int]]]) -> list[list[int]]:
        """Prefill the left-padded ``ids`` behind the virtual tokens, then hand the per-token step
        to ``decode`` (the shared numpy loop). Positions: virtual tokens 0..n-1, a row's real
        tokens from n on, whatever its padding (as in training); pads are masked."""
        from transformers import DynamicCache

        n = self.spec.n_virtual if self.enabled else 0
        tok = torch.from_numpy(ids).long().to(device)
        batch = tok.shape[0]
        real = torch.from_numpy((np.arange(ids.shape[1])[None, :] >= padding[:, None]).astype(np.int64)).to(device)
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

        def forward(attn: torch.Tensor, pos: torch.Tensor, **inputs: Any) -> np.ndarray:
            out = self.base(attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True,
                            logits_to_keep=1, **inputs)
            return out.logits[:, -1].float().cpu().numpy()

        state = {"attn": attn, "pos": pos[:, -1:]}

        def step(tokens: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
            if keep is not None:
                idx = torch.from_numpy(keep).to(device)
                cache.batch_select_indices(idx)
                state["attn"], state["pos"] = state["attn"][idx], state["pos"][idx]
            state["attn"] = torch.cat([state["attn"], state["attn"].new_ones((len(tokens), 1))], dim=1)
            state["pos"] = state["pos"] + 1
            return forward(state["attn"], state["pos"], input_ids=torch.from_numpy(tokens).long().to(device)[:, None])

        first = forward(attn, pos, **kwargs)
        return decode(first, step)


def check_supported(base: Any, spec: VirtualSpec, chunked: bool, grad_checkpointing: bool) -> None:
    if not chunked:
        raise MlxtuneError(f"adapter.method = \"{spec.method}\" on the torch backend supports llama, mistral, qwen2 and "
                           f"qwen3 models (this one is {base.config.model_type!r})")
    if spec.method == "prefix" and grad_checkpointing:
        raise MlxtuneError('adapter.method = "prefix" does not work with gradient checkpointing (transformers drops '
                           "the prefix cache under it); set train.grad_checkpointing = false")


def generate_virtual(virtual: VirtualTorch, prompts: list[np.ndarray], max_tokens: int, *, temperature: float,
                     top_p: float, seed: int, eos_ids: Sequence[int], pad_id: int, adapter: bool,
                     should_stop: Callable[[list[int]], bool] | None, device: torch.device) -> list[list[int]]:
    """``Backend.generate`` for a prompt/prefix model (see :meth:`VirtualTorch.generate`)."""
    from mlxtune.evaluation.generation import decode_loop, left_pad

    ids, padding = left_pad(prompts, pad_id)

    def decode(first: np.ndarray, step: Callable) -> list[list[int]]:
        return decode_loop(first, step, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           eos_ids=eos_ids, should_stop=should_stop)

    if adapter:
        return virtual.generate(ids, padding, device, max_tokens, decode)
    with virtual.disabled():
        return virtual.generate(ids, padding, device, max_tokens, decode)
