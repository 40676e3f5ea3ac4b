"""A decoder's sizes as config.json gives them: read once, for the planner and the adapters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlxtune.errors import MlxtuneError


@dataclass(frozen=True)
class ModelShape:
    """Layers, widths, heads and vocabulary of a decoder-only transformer."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, cfg: dict[str, Any], where: str = "config.json") -> ModelShape:
        """From config.json as a dict; a missing size is an error naming the key.

        Absent ``num_key_value_heads`` means one KV head per head, absent ``head_dim`` means
        hidden / heads: transformers' defaults for the llama family."""
        mt = str(cfg.get("model_type", ""))
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                model_type=mt, layers=int(cfg["num_hidden_layers"]), hidden=hidden,
                intermediate=int(cfg["intermediate_size"]), heads=heads,
                kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
                qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias", False)), qk_norm=mt == "qwen3",
            )
        except KeyError as e:
            raise MlxtuneError(f"{where}: no {e.args[0]!r} (a decoder's config.json names its sizes)") from None

    @property
    def kv_width(self) -> int:
        """Width of one layer's keys (or values) for one token: KV heads x head size."""
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Short name -> (in_features, out_features) of each projection in a block."""
        d, q, kv, f = self.hidden, self.heads * self.head_dim, self.kv_width, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    def parameters(self) -> dict[str, int]:
        """Parameter counts: quantizable matrices (projections, embedding, untied head) and the rest."""
        lin = self.layers * sum(i * o for i, o in self.linears().values())
        small = (2 * self.layers + 1) * self.hidden
        if self.qkv_bias:
            small += self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.qk_norm:
            small += 2 * self.layers * self.head_dim
        return {"projections": lin, "embedding": self.vocab * self.hidden,
                "head": 0 if self.tied else self.vocab * self.hidden, "other": small}
