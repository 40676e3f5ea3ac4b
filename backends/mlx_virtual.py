"""Prompt and prefix tuning on the MLX backend (mlx-lm has neither), with PEFT's maths.

:class:`VirtualAdapter` is the backend's adapter object for both methods (the interface is
``backends/mlx_adapters.py``'s ``MLXAdapter``). The trainable weights live in a
:class:`VirtualTokens` module attached to the model as ``model.virtual`` after the base is frozen,
so they are the model's only trainable parameters and ``nn.value_and_grad`` / the optimizer need
nothing special. :func:`body` (the adapter's ``hidden``) replaces ``model.model(inputs)`` in the
loss and returns the final hidden states of the real tokens only:

- prompt: the virtual embeddings are concatenated in front of the token embeddings (mlx-lm's
  ``input_embeddings``); positions count from 0 over the whole sequence, so the first real token
  sits at n_virtual, as in PEFT; the virtual positions are cut off the output (no loss on them);
- prefix: each layer's attention gets a :class:`PrefixCache` holding that layer's prefix keys and
  values, never rotated (PEFT passes them as ``past_key_values``); the real tokens' rope offset is
  n_virtual, as transformers counts the cache. The cache concatenates instead of writing into a
  preallocated buffer (mlx-lm's ``KVCache``) so gradients flow into the prefix.

Grouped-query attention: the prefix has num_key_value_heads heads per layer (PEFT's layout, see
``mlxtune/adapters/virtual.py``); mlx's attention repeats them for the query heads like the real keys.

Generation: the prefix (or, for prompt tuning, the virtual tokens' keys and values, computed once
for one row: they attend only to each other) sits at the start of every row's cache, then the
left-padded prompts; the mask hides the pads, never the prefix, and each row's rope offset starts
its real tokens at n_virtual whatever its padding, as in training.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxtune.adapters.virtual import EMBED_KEY, VirtualSpec, load_virtual, save_virtual

from .mlx_adapters import base_generation_cache, base_hidden

# mlxtune/adapters/virtual.py's PEFT names -> this module's parameter paths
_MLP = {"transform.0.weight": "proj_in.weight", "transform.0.bias": "proj_in.bias",
        "transform.2.weight": "proj_out.weight", "transform.2.bias": "proj_out.bias"}


class VirtualTokens(nn.Module):
    """The prompt/prefix parameters (PEFT's prompt encoder), float32."""

    def __init__(self, spec: VirtualSpec) -> None:
        super().__init__()
        shapes = spec.shapes()
        self.embedding = mx.zeros(shapes[EMBED_KEY], dtype=mx.float32)
        if spec.projection:
            self.proj_in = nn.Linear(spec.kv_width, spec.mlp_hidden)
            self.proj_out = nn.Linear(spec.mlp_hidden, spec.prefix_width)
        self.spec = spec
        self.enabled = True  # False: the base model (adapter off)

    def flat_prefix(self) -> mx.array:
        """(n_virtual, layers * 2 * kv_width): every layer's key and value per virtual token."""
        if not self.spec.projection:
            return self.embedding
        return self.proj_out(mx.tanh(self.proj_in(self.embedding)))

    def layer_prefixes(self, dtype: Any) -> list[tuple[mx.array, mx.array]]:
        """Per layer (keys, values), each (1, kv_heads, n_virtual, head_dim), as PEFT's get_prompt
        views and permutes the flat prefix."""
        s = self.spec
        kv = self.flat_prefix().astype(dtype).reshape(s.n_virtual, 2 * s.layers, s.kv_heads, s.head_dim)
        kv = kv.transpose(1, 2, 0, 3)  # (2 * layers, heads, n, head_dim)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(s.layers)]


class PrefixCache:
    """One layer's KV cache whose first n entries are the prefix, shared by all rows, followed by
    the (optionally left-padded) real tokens. Concatenates (differentiable); the mask hides each
    row's pads, which sit right after the prefix; the rope offset of a row's first real token is n."""

    def __init__(self, keys: mx.array, values: mx.array, left_padding: np.ndarray | None = None) -> None:
        self.keys, self.values = keys, values
        self.n = self._idx = int(keys.shape[2])
        self.pad = None if left_padding is None else mx.array(np.asarray(left_padding, dtype=np.int32))
        self.offset: Any = self.n if self.pad is None else self.n - self.pad

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.concatenate([self.keys, keys], axis=2)
        self.values = mx.concatenate([self.values, values], axis=2)
        self.offset = self.offset + keys.shape[2]
        self._idx += keys.shape[2]
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None, **_: Any) -> mx.array:
        if window_size is not None:
            raise ValueError("PrefixCache: sliding-window attention is not supported")
        cols = mx.arange(self._idx + N)[None]
        mask = mx.arange(self._idx, self._idx + N)[:, None] >= cols  # causal; the prefix is before every query
        if self.pad is not None:
            c = cols[None, None]
            mask = mask & ~((c >= self.n) & (c < self.n + self.pad[:, None, None, None]))
        return mask

    def filter(self, rows: mx.array) -> None:
        self.keys, self.values = self.keys[rows], self.values[rows]
        if self.pad is not None:
            self.pad, self.offset = self.pad[rows], self.offset[rows]


def attach(model: nn.Module, spec: VirtualSpec) -> VirtualTokens:
    """Add the (trainable) virtual tokens to a frozen model."""
    model.virtual = VirtualTokens(spec)
    return model.virtual


def get(model: nn.Module) -> VirtualTokens | None:
    """The model's virtual tokens when present and enabled."""
    v = model["virtual"] if "virtual" in model else None
    return v if v is not None and v.enabled else None


def _batch(pairs: list[tuple[mx.array, mx.array]], batch: int) -> list[tuple[mx.array, mx.array]]:
    return [(mx.broadcast_to(k, (batch, *k.shape[1:])), mx.broadcast_to(v, (batch, *v.shape[1:]))) for k, v in pairs]


def body(model: nn.Module, inputs: mx.array) -> mx.array:
    """Final hidden states [B, T, d] of the real tokens ``inputs`` [B, T] behind the virtual tokens."""
    v = get(model)
    if v is None:
        return base_hidden(model, inputs)
    n = v.spec.n_virtual
    if v.spec.method == "prompt":
        emb = model.model.embed_tokens(inputs)
        virt = mx.broadcast_to(v.embedding.astype(emb.dtype)[None], (inputs.shape[0], n, emb.shape[-1]))
        return model.model(inputs, input_embeddings=mx.concatenate([virt, emb], axis=1))[:, n:]
    dtype = model.model.embed_tokens.weight.dtype
    caches = [PrefixCache(k, val) for k, val in _batch(v.layer_prefixes(dtype), inputs.shape[0])]
    return model.model(inputs, cache=caches)


def generation_cache(model: nn.Module, padding: np.ndarray) -> list[Any]:
    """Per-layer caches holding the prefix (prompt tuning: the virtual tokens' keys and values)
    ahead of left-padded prompts with ``padding`` pads per row; mlx-lm's plain ``BatchKVCache``
    when the virtual tokens are off."""
    from mlx_lm.models.cache import KVCache

    v = get(model)
    if v is None:
        return base_generation_cache(model, padding)
    dtype = model.model.embed_tokens.weight.dtype
    if v.spec.method == "prompt":
        n = v.spec.n_virtual
        tmp = [KVCache() for _ in model.model.layers]
        model.model(mx.zeros((1, n), dtype=mx.int32), cache=tmp, input_embeddings=v.embedding.astype(dtype)[None])
        pairs = [(c.keys[..., :n, :], c.values[..., :n, :]) for c in tmp]
    else:
        pairs = v.layer_prefixes(dtype)
    return [PrefixCache(k, val, padding) for k, val in _batch(pairs, len(padding))]


class VirtualAdapter:
    """Prompt or prefix tuning as the backend's adapter (``MLXAdapter``): the :class:`VirtualTokens`
    attached to the model, saved in PEFT's format (mlx-lm has none for these), as the torch
    backend writes it."""

    def __init__(self, model: nn.Module, spec: VirtualSpec, base_model: str) -> None:
        self.tokens = attach(model, spec)
        self.spec, self.base_model = spec, base_model

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight name -> shape (``mlxtune/adapters/virtual.py``)."""
        return self.spec.shapes()

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.spec.check_weights(weights)
        flat = [(_MLP.get(k, k.removesuffix(".weight") if k == EMBED_KEY else k), mx.array(np.asarray(v, dtype=np.float32)))
                for k, v in weights.items()]
        self.tokens.load_weights(flat, strict=True)
        mx.eval(self.tokens.parameters())

    def get_weights(self) -> dict[str, np.ndarray]:
        params = dict(tree_flatten(self.tokens.parameters()))
        out = {EMBED_KEY: np.array(params["embedding"].astype(mx.float32))}
        for peft_name, ours in _MLP.items():
            if ours in params:
                out[peft_name] = np.array(params[ours].astype(mx.float32))
        return out

    def save(self, path: Path) -> None:
        save_virtual(Path(path), self.spec, self.get_weights(), self.base_model)

    def load(self, path: Path) -> None:
        self.set_weights(load_virtual(Path(path), self.spec))

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The virtual tokens switched off meanwhile."""
        self.tokens.enabled = False
        try:
            yield
        finally:
            self.tokens.enabled = True

    def hidden(self, model: nn.Module, inputs: mx.array) -> mx.array:
        return body(model, inputs)

    def generation_cache(self, model: nn.Module, padding: np.ndarray) -> list[Any]:
        return generation_cache(model, padding)
