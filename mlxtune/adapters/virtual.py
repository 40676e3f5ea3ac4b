"""Prompt tuning and prefix tuning: the shapes and the initial values, framework-free.

Both backends load the same initial values from here (numpy, seeded), so their losses can be
compared step by step, as for LoRA (:func:`mlxtune.adapters.lora.init_lora`). The weights use the names
of PEFT's prompt encoder state dict, which both backends read and write:

- prompt tuning: ``embedding.weight`` (n_virtual, hidden), the virtual token embeddings put in
  front of the real tokens' embeddings;
- prefix tuning without projection: ``embedding.weight`` (n_virtual, layers * 2 * kv_width): for
  each virtual token, layer 0's key, layer 0's value, layer 1's key, ... each (kv_heads, head_dim)
  flattened; kv_width = num_key_value_heads * head_dim (PEFT sizes the prefix by the key/value
  heads for grouped-query attention, so no repeat is needed);
- prefix tuning with ``prefix_projection``: ``embedding.weight`` (n_virtual, kv_width) and the MLP
  ``transform.0`` Linear(kv_width, mlp_hidden), tanh, ``transform.2`` Linear(mlp_hidden,
  layers * 2 * kv_width), whose output has the layout above.

PEFT's PrefixTuningConfig reads ``token_dim`` as the kv width for GQA models, which is why the
projection's input is kv_width and not the model's hidden size.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlxtune.errors import MlxtuneError
from mlxtune.models.shape import ModelShape

EMBED_KEY = "embedding.weight"
EMBED_TENSOR = "model.embed_tokens.weight"


@dataclass(frozen=True)
class VirtualSpec:
    """What a prompt/prefix adapter looks like for one model."""

    method: str  # "prompt" | "prefix"
    n_virtual: int
    hidden: int
    layers: int
    kv_heads: int
    head_dim: int
    projection: bool = False
    mlp_hidden: int = 0  # prefix_projection's hidden size (resolved: never 0)
    heads: int = 0  # attention heads (PEFT's config records them)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def prefix_width(self) -> int:
        """Width of one virtual token's flattened prefix: every layer's key and value."""
        return self.layers * 2 * self.kv_width

    @classmethod
    def from_config(cls, config: dict[str, Any], adapter: Any) -> VirtualSpec:
        """From config.json (as a dict) and the recipe's ``[adapter]``."""
        return cls.from_shape(ModelShape.from_config(config), adapter)

    @classmethod
    def from_shape(cls, shape: ModelShape, adapter: Any) -> VirtualSpec:
        projection = adapter.method == "prefix" and bool(adapter.prefix_projection)
        return cls(method=adapter.method, n_virtual=int(adapter.num_virtual_tokens), hidden=shape.hidden,
                   layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                   projection=projection, heads=shape.heads,
                   mlp_hidden=(int(adapter.prefix_hidden) or shape.kv_width) if projection else 0)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Weight name -> shape, in PEFT's prompt encoder naming."""
        if self.method == "prompt":
            return {EMBED_KEY: (self.n_virtual, self.hidden)}
        if not self.projection:
            return {EMBED_KEY: (self.n_virtual, self.prefix_width)}
        h, kv, out = self.mlp_hidden, self.kv_width, self.prefix_width
        return {EMBED_KEY: (self.n_virtual, kv), "transform.0.weight": (h, kv), "transform.0.bias": (h,),
                "transform.2.weight": (out, h), "transform.2.bias": (out,)}

    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def check_weights(self, weights: dict[str, Any]) -> None:
        """ValueError unless ``weights`` has exactly :meth:`shapes`' names and shapes (what a
        backend's ``set_adapter_weights`` accepts)."""
        shapes = self.shapes()
        if set(weights) != set(shapes):
            raise ValueError(f"{self.method} weights {sorted(weights)} do not match {sorted(shapes)}")
        for k, v in weights.items():
            if tuple(v.shape) != shapes[k]:
                raise ValueError(f"{k}: shape {v.shape} != {shapes[k]}")


def text_init_ids(tokenizer: Any, text: str, n_virtual: int) -> list[int]:
    """Token ids of ``text`` repeated or cut to ``n_virtual``, as PEFT's TEXT init does it (the
    tokenizer's default special tokens included, e.g. a BOS)."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise MlxtuneError(f"adapter.prompt_init_text = {text!r} gives no tokens; write a few words")
    return (ids * math.ceil(n_virtual / len(ids)))[:n_virtual]


def _stream(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def init_virtual(spec: VirtualSpec, seed: int, text_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Initial weights as PEFT draws them (in distribution; each tensor from its own stream
    seeded by (seed, crc32 of its name)): embeddings normal(0, 1) as ``torch.nn.Embedding``,
    Linear weights and biases uniform(+-1/sqrt(fan_in)) as ``torch.nn.Linear``. ``text_rows``
    (n_virtual, hidden): prompt tuning's TEXT init, the embedding rows of the init text."""
    out: dict[str, np.ndarray] = {}
    for name, shape in spec.shapes().items():
        rng = _stream(seed, name)
        if name == EMBED_KEY:
            if text_rows is not None:
                if spec.method != "prompt" or tuple(text_rows.shape) != shape:
                    raise ValueError(f"text init rows {text_rows.shape} do not fit {spec.method} embedding {shape}")
                out[name] = np.asarray(text_rows, dtype=np.float32).copy()
            else:
                out[name] = rng.standard_normal(shape).astype(np.float32)
        else:
            fan_in = spec.shapes()[name.replace("bias", "weight")][1]
            bound = 1.0 / math.sqrt(fan_in)
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return out


# ---------------------------------------------------------------- embedding rows from safetensors


_NUMPY = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_embedding_rows(model_dir: Path, ids: list[int]) -> np.ndarray:
    """float32 rows ``ids`` of the model's input embedding, read from its safetensors files with
    numpy alone (bfloat16 widened bit-exactly), so the core needs no framework for TEXT init."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shard = json.loads(index.read_text(encoding="utf-8"))["weight_map"].get(EMBED_TENSOR)
        files = [model_dir / shard] if shard else []
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    for path in files:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
            info = header.get(EMBED_TENSOR)
            if info is None:
                continue
            dtype, shape, (start, _) = info["dtype"], info["shape"], info["data_offsets"]
            raw_dtype = np.uint16 if dtype == "BF16" else _NUMPY.get(dtype)
            if raw_dtype is None:
                raise MlxtuneError(f"{path}: {EMBED_TENSOR} has dtype {dtype}; text init reads F32, F16 or BF16")
            table = np.memmap(path, dtype=raw_dtype, mode="r", offset=8 + n + start, shape=tuple(shape))
            bad = [i for i in ids if not 0 <= i < shape[0]]
            if bad:
                raise MlxtuneError(f"adapter.prompt_init_text: token ids {bad[:3]} outside the embedding ({shape[0]} rows)")
            rows = np.asarray(table[ids])
            if dtype == "BF16":
                rows = (rows.astype(np.uint32) << 16).view(np.float32)
            return rows.astype(np.float32)
    raise MlxtuneError(f"{model_dir}: no {EMBED_TENSOR} in its safetensors files (needed for prompt_init = \"text\")")


def initial_weights(model_dir: Path, config: dict[str, Any], recipe: Any) -> dict[str, np.ndarray]:
    """The recipe's prompt/prefix adapter's initial weights for this model."""
    spec = VirtualSpec.from_config(config, recipe.adapter)
    rows = None
    if spec.method == "prompt" and recipe.adapter.prompt_init == "text":
        from mlxtune.models.source import load_tokenizer

        tok = load_tokenizer(model_dir, recipe.model.trust_remote_code)
        rows = read_embedding_rows(model_dir, text_init_ids(tok, recipe.adapter.prompt_init_text, spec.n_virtual))
    return init_virtual(spec, recipe.train.seed, rows)


# ---------------------------------------------------------------- files (PEFT's format, both backends)


ADAPTER_FILE = "adapter_model.safetensors"
ENCODER_FILE = "prefix_encoder.safetensors"  # mlxtune's: the projection MLP, which PEFT does not save
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}


def projected_prefix(weights: dict[str, np.ndarray]) -> np.ndarray:
    """The prefix the MLP makes of the embedding (what PEFT saves as ``prompt_embeddings``)."""
    e = weights[EMBED_KEY].astype(np.float64)
    h = np.tanh(e @ weights["transform.0.weight"].T.astype(np.float64) + weights["transform.0.bias"])
    return (h @ weights["transform.2.weight"].T.astype(np.float64) + weights["transform.2.bias"]).astype(np.float32)


def peft_config_dict(spec: VirtualSpec, base_model: str) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for this adapter (inference mode)."""
    cfg: dict[str, Any] = {
        "auto_mapping": None, "base_model_name_or_path": base_model, "inference_mode": True,
        "modules_to_save": None, "num_layers": spec.layers, "num_transformer_submodules": 1,
        "num_virtual_tokens": spec.n_virtual, "peft_type": PEFT_TYPES[spec.method], "revision": None,
        "task_type": "CAUSAL_LM",
    }
    if spec.method == "prompt":
        cfg |= {"num_attention_heads": spec.heads, "token_dim": spec.hidden,
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_kwargs": None,
                "tokenizer_name_or_path": None}
    else:
        cfg |= {"num_attention_heads": spec.kv_heads, "token_dim": spec.kv_width, "prefix_projection": spec.projection,
                "encoder_hidden_size": spec.mlp_hidden or spec.kv_width, "init_weights": None}
    return cfg


def save_virtual(path: Path, spec: VirtualSpec, weights: dict[str, np.ndarray], base_model: str,
                 peft_files: bool = True) -> None:
    """Write the adapter in PEFT's format (``adapter_model.safetensors`` with ``prompt_embeddings``
    and ``adapter_config.json``), loadable by ``PeftModel.from_pretrained``; with a projection,
    also ``prefix_encoder.safetensors`` (embedding and MLP), which mlxtune needs to go on training.
    ``peft_files=False`` writes only that extra file (the torch backend lets PEFT write its own)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    w = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
    if peft_files:
        prompt = projected_prefix(w) if spec.projection else w[EMBED_KEY]
        save_file({"prompt_embeddings": prompt}, str(path / ADAPTER_FILE), metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(peft_config_dict(spec, base_model), indent=2, sort_keys=True) + "\n",
                                                  encoding="utf-8")
    if spec.projection:
        save_file(w, str(path / ENCODER_FILE), metadata={"format": "mlxtune-prefix-encoder"})


def load_virtual(path: Path, spec: VirtualSpec) -> dict[str, np.ndarray]:
    """The weights of a prompt/prefix adapter folder in PEFT's format (from either backend, or
    PEFT itself), checked against the recipe's adapter. A prefix saved with a projection loads
    into a recipe without one (its projected prefix becomes the embedding); the other way round
    needs mlxtune's ``prefix_encoder.safetensors``."""
    from safetensors.numpy import load_file

    path = Path(path)
    cfg_path, file = path / "adapter_config.json", path / ADAPTER_FILE
    if not cfg_path.is_file() or not file.is_file():
        raise MlxtuneError(f"{path}: no adapter_config.json + {ADAPTER_FILE} (not a PEFT {spec.method} adapter folder)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    kind, n = cfg.get("peft_type"), cfg.get("num_virtual_tokens")
    if kind != PEFT_TYPES[spec.method] or n != spec.n_virtual:
        raise MlxtuneError(f"{path}: adapter ({kind}, {n} virtual tokens) does not match the recipe "
                           f"({PEFT_TYPES[spec.method]}, adapter.num_virtual_tokens = {spec.n_virtual})")
    shapes = spec.shapes()
    if spec.projection:
        if not (path / ENCODER_FILE).is_file():
            raise MlxtuneError(f"{path}: this prefix adapter holds only the projected prefix, not the projection MLP "
                               f"({ENCODER_FILE}); load it with adapter.prefix_projection = false")
        weights = load_file(str(path / ENCODER_FILE))
    else:
        weights = {EMBED_KEY: load_file(str(file)).get("prompt_embeddings")}
    bad = [k for k in shapes if k not in weights or weights[k] is None or tuple(weights[k].shape) != shapes[k]]
    if bad or set(weights) != set(shapes):
        have = {k: tuple(v.shape) for k, v in weights.items() if v is not None}
        raise MlxtuneError(f"{path}: adapter tensors {have} do not fit this model's {spec.method} adapter {shapes}")
    return {k: v.astype(np.float32) for k, v in weights.items()}
