"""The MLX backend's loss (the "same loss" rule, see ``backends/apple_mlx.py``): the shift for
next-token prediction, the selected rows, and the chunked float32 cross-entropy.

The order of the operations here is part of the parity with the torch backend: change it only
together with the step-parity tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import mlx.core as mx
import mlx.nn as nn

Hidden = Callable[[nn.Module, mx.array], mx.array]  # (model, inputs [B, T]) -> final hidden states [B, T, d]

ROW_PAD = 64  # target rows are padded to a multiple of this: fewer distinct shapes for mx.compile


def _head(model: nn.Module) -> Any:
    """The vocabulary projection: the tied embedding matrix or ``lm_head``."""
    return model.model.embed_tokens.as_linear if model.args.tie_word_embeddings else model.lm_head


def _targets(tokens: np.ndarray, mask: np.ndarray) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """(inputs [B, T-1], rows, target ids, weights): the one place the shift happens on MLX.

    ``rows`` index the flattened [B * (T-1)] hidden states that predict a target under ``mask``
    (token t is predicted from position t - 1); padded with weight-0 rows to a multiple of ROW_PAD.
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be int32[B, T] with T >= 2, got shape {tokens.shape}")
    rows = np.flatnonzero(np.asarray(mask, dtype=bool)[:, 1:]).astype(np.int32)
    n = len(rows)
    pad = -n % ROW_PAD if n else ROW_PAD
    weights = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    rows = np.concatenate([rows, np.zeros(pad, np.int32)])
    targets = tokens[:, 1:].reshape(-1)[rows]
    return mx.array(tokens[:, :-1]), mx.array(rows), mx.array(targets), mx.array(weights)


def _rows(model: nn.Module, hidden: Hidden, inputs: mx.array, rows: mx.array) -> mx.array:
    """Final hidden states [len(rows), d] of the selected positions: the head runs on these only.
    ``hidden`` is the adapter's body forward (``MLXAdapter.hidden``: ``model.model(inputs)``, behind
    the prompt/prefix for those)."""
    h = hidden(model, inputs)
    return h.reshape(-1, h.shape[-1])[rows]


def _nll_rows(head: Any, h: mx.array, targets: mx.array, chunk: int) -> mx.array:
    """float32 NLL per row of ``head(h)`` against ``targets``, ``chunk`` rows at a time, each
    chunk after the previous one (a zero-valued dependency, as in :func:`_loss`)."""
    out: list[mx.array] = []
    for s in range(0, h.shape[0], chunk):
        hc = h[s:s + chunk] if not out else h[s:s + chunk] + (0 * out[-1][0]).astype(h.dtype)
        logits = head(hc).astype(mx.float32)
        out.append(nn.losses.cross_entropy(logits, targets[s:s + chunk], reduction="none"))
    return mx.concatenate(out)


def _head_rows(model: nn.Module, ids: mx.array) -> mx.array:
    """Rows ``ids`` of the head's weight matrix (dequantized when quantized): the gradient of a
    logit with respect to the hidden state."""
    if model.args.tie_word_embeddings:
        return model.model.embed_tokens(ids)
    head = model.lm_head
    if isinstance(head, nn.QuantizedLinear):
        return mx.dequantize(head.weight[ids], head.scales[ids], head.biases[ids], head.group_size, head.bits)
    return head.weight[ids]


def _loss(model: nn.Module, hidden: Hidden, inputs: mx.array, rows: mx.array, targets: mx.array, weights: mx.array,
          inv_denom: mx.array, chunk: int):
    """(sum(NLL * weights) * inv_denom, NLL * weights per target row) with a chunked cross-entropy.

    The rows' NLLs go back (not their float32 sum) so that the host adds them in float64: the
    logged loss then does not depend on how a step's rows are split into passes or ranks.

    The head is frozen, so each chunk's gradient with respect to its hidden states is formed
    where its logits are: ``(softmax @ W - W[target]) * weight`` (the head's vjp of the softmax,
    minus the target's row) and packed with the chunk's loss into one array. A chunk's logits
    are dead once that array exists; the next chunk waits for it (a zero-valued dependency), so
    MLX's scheduler cannot start every chunk at once. ``h * stop_gradient(dh)`` minus its own
    stopped value is exactly 0 and carries that gradient into the body's backward pass.
    """
    h = _rows(model, hidden, inputs, rows)
    head, d = _head(model), h.shape[-1]
    hs = mx.stop_gradient(h)
    nll, rows_nll, grads, prev = [], [], [], None
    for s in range(0, h.shape[0], chunk):
        hc, t, w = hs[s:s + chunk], targets[s:s + chunk], weights[s:s + chunk]
        if prev is not None:
            hc = hc + (0 * prev).astype(hc.dtype)
        logits = head(hc).astype(mx.float32)
        # (one exp for both the log-sum-exp and the softmax is ~25% faster on MLX's CPU, but moved the
        # 2-rank vs 1-process adapter difference from 8.5e-7 to 2.4e-6: not taken)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        ce = (lse[:, 0] - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]) * w
        _, (dh,) = mx.vjp(head, [hc], [mx.exp(logits - lse).astype(hc.dtype)])
        dh = (dh - _head_rows(model, t)).astype(mx.float32) * w[:, None]
        packed = mx.concatenate([dh.reshape(-1), ce.sum()[None]])
        prev = packed[-1]
        nll.append(prev)
        rows_nll.append(ce)
        grads.append(packed[:-1].reshape(-1, d))
    total = mx.stack(nll).sum()
    carrier = (h * mx.stop_gradient(mx.concatenate(grads)).astype(h.dtype)).sum()
    value = total + (carrier - mx.stop_gradient(carrier)).astype(mx.float32)
    return value * inv_denom, mx.concatenate(rows_nll)
