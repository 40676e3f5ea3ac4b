"""Model FLOPs of one LoRA training step per processed position, and the MFU they give.

Framework-free arithmetic on the model's shape (config.json), like ``memory.py``.

Conventions (the usual "model FLOPs" ones, so numbers compare across tools):

- A matmul of (m x k) by (k x n) is ``2 m k n`` FLOPs (one multiply + one add per MAC).
  Per position, a linear layer of ``i x o`` weights costs ``2 i o`` forward.
- Frozen body (the seven projections of every block): forward ``2 i o``, and in backward only the
  input gradient ``2 i o`` (no weight gradient). Backward runs from the head down to the lowest
  adapted block only: below it nothing needs a gradient. Elementwise work (norms, activations,
  rotary, softmax, the loss) is left out: it is a few per cent at these widths.
- Attention: scores ``Q K^T`` and ``P V`` are ``2 x 2 heads head_dim ctx`` FLOPs forward per
  position, where ``ctx`` is the context actually attended. Causal attention counts the half
  that is needed: average ``ctx = seq_len / 2`` (a kernel that computes the masked half too does
  wasted work, which is not counted). Backward is twice forward (four matmuls: dP, dV, dQ, dK),
  in adapted blocks only.
- Adapter (LoRA A: ``i x r``, B: ``r x o``): forward ``2 r (i + o)``, backward input gradients
  plus weight gradients ``2 x 2 r (i + o)``: ``6 r (i + o)`` in all.
- Head (``hidden x vocab``): forward + input-gradient backward ``4 hidden vocab``, only on the
  positions that carry loss (``trained_share`` of the processed ones: the chunked
  cross-entropy computes no logits elsewhere). A tied head has no weight gradient either: the
  embedding is frozen.

Positions are *processed* positions: rows x padded width, pads included, since the step
computes them. So ``flops.total x processed positions/s`` is the achieved FLOP rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxtune.models.shape import ModelShape


@dataclass(frozen=True)
class Flops:
    """FLOPs per processed position of one training step (forward + backward), by part."""

    body: float
    attention: float
    adapter: float
    head: float

    @property
    def total(self) -> float:
        return self.body + self.attention + self.adapter + self.head


def training_flops(shape: ModelShape, rank: int, targets: set[str], adapted_layers: int,
                   seq_len: int, trained_share: float, causal: bool = True) -> Flops:
    """Model FLOPs per processed position of one LoRA step (see the module doc for the rules).

    ``adapted_layers``: the last N blocks carry adapters on ``targets`` (projection short names);
    ``seq_len``: the padded width of a row; ``trained_share``: loss positions / processed ones."""
    lin = shape.linears()
    unknown = set(targets) - set(lin)
    if unknown:
        raise ValueError(f"unknown projections {sorted(unknown)}; known: {sorted(lin)}")
    n = max(0, min(int(adapted_layers), shape.layers))
    if not targets or rank <= 0:
        n = 0  # nothing trained: no backward at all
    block = sum(i * o for i, o in lin.values())
    body = 2.0 * block * shape.layers + 2.0 * block * n
    ctx = seq_len / 2 if causal else float(seq_len)
    attn_fwd = 4.0 * shape.heads * shape.head_dim * ctx
    attention = attn_fwd * shape.layers + 2.0 * attn_fwd * n
    adapter = 6.0 * rank * sum(lin[t][0] + lin[t][1] for t in targets) * n
    share = min(1.0, max(0.0, float(trained_share)))
    head = (4.0 if n else 2.0) * shape.hidden * shape.vocab * share
    return Flops(body=body, attention=attention, adapter=adapter, head=head)


def mfu(flops_per_pos: float, positions_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s as a share of ``peak_flops`` (FLOP/s; the
    measured matmul rate of the same precision, or a datasheet peak). 0 when the peak is unknown."""
    if not peak_flops or peak_flops <= 0:
        return 0.0
    return flops_per_pos * positions_per_s / peak_flops
