"""The adapter interface of the MLX backend, and its LoRA/DoRA adapter.

:class:`MLXAdapter` is what :class:`backends.apple_mlx.MLXBackend` asks of an adapter method (as
peft's ``LoraVariant`` or torchtune's ``AdapterModule``): one object per method, chosen once in
``MLXBackend.load``, so the backend's methods have a single path. :class:`LoraAdapter` (LoRA,
QLoRA's LoRA, DoRA) is here; ``backends/mlx_virtual.py`` has :class:`VirtualAdapter` (prompt and
prefix tuning). ``backends/apple_mlx.py``'s docstring says what each computes and why.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxtune.adapters.lora import MAGNITUDE, PEFT_DIR, LoraSpec, check_weight_keys, load_lora_folder, write_peft
from mlxtune.errors import MlxtuneError

if TYPE_CHECKING:
    from mlxtune.recipe.schema import AdapterConfig

LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)  # the layers an adapter can wrap


class MLXAdapter(Protocol):
    """One adapter method on a frozen mlx-lm model. Its trainable arrays live in the model (so
    ``nn.value_and_grad`` and the optimizer see them as the model's trainable parameters);
    weights cross in the boundary layout of ``backends.Backend``."""

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """``Backend.adapter_shapes``: LoRA module path -> (in, out); prompt/prefix name -> shape."""

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Put boundary-layout weights in place (ValueError when they do not fit)."""

    def get_weights(self) -> dict[str, np.ndarray]:
        """The current weights in the boundary layout, float32 numpy."""

    def save(self, path: Path) -> None:
        """Write the adapter folder ``path``: mlx-lm's format for LoRA/DoRA, PEFT's for prompt/prefix."""

    def load(self, path: Path) -> None:
        """Read an adapter folder written by either backend; MlxtuneError unless it is this adapter."""

    def disabled(self) -> AbstractContextManager[None]:
        """The base model meanwhile (adapter off): for base-model eval and generation."""

    def hidden(self, model: nn.Module, inputs: mx.array) -> mx.array:
        """Final hidden states [B, T, d] of the real tokens ``inputs`` [B, T] (the loss's body forward)."""

    def generation_cache(self, model: nn.Module, padding: np.ndarray) -> list[Any]:
        """Per-layer KV caches to start batched generation with, for prompts left-padded by
        ``padding`` tokens per row (whatever the adapter puts ahead of the prompts included)."""


def base_hidden(model: nn.Module, inputs: mx.array) -> mx.array:
    """The plain body forward: ``model.model(inputs)``."""
    return model.model(inputs)


def base_generation_cache(model: nn.Module, padding: np.ndarray) -> list[Any]:
    """mlx-lm's ``BatchKVCache`` per layer: its mask hides each row's left padding."""
    from mlx_lm.models.cache import BatchKVCache

    return [BatchKVCache(padding.tolist()) for _ in model.layers]


def check_targets(blocks: list[nn.Module], targets: Iterable[str]) -> None:
    """Refuse target module names that are no linear layer in the model's blocks."""
    available = {r.rsplit(".", 1)[-1] for r, m in blocks[0].named_modules() if isinstance(m, LINEAR_TYPES)}
    missing = set(targets) - available
    if missing:
        raise MlxtuneError(
            f"adapter.target_modules: {sorted(missing)} not found in the model's blocks; "
            f"linear layers there: {', '.join(sorted(available))}"
        )


# ------------------------------------------------------------------ DoRA as peft computes it


_DORA: list[type] = []


def _dora_class() -> type:
    """mlx-lm's ``DoRALinear`` computing what peft's DoRA computes (``backends/apple_mlx.py``'s
    docstring), built on first use because importing mlx_lm takes seconds."""
    if _DORA:
        return _DORA[0]
    from mlx_lm.tuner.dora import DoRALinear

    class PeftDoRALinear(DoRALinear):
        @classmethod
        def wrap(cls, linear: nn.Module, r: int, dropout: float, scale: float) -> PeftDoRALinear:
            # DoRALinear.from_base builds a DoRALinear, not the subclass
            out_dims, in_dims = linear.weight.shape
            if isinstance(linear, nn.QuantizedLinear):
                in_dims = in_dims * 32 // linear.bits
            layer = cls(input_dims=in_dims, output_dims=out_dims, r=r, dropout=dropout, scale=scale)
            layer.set_linear(linear)
            layer.dropout_p = dropout
            return layer

        def magnitude_init(self) -> mx.array:
            """Row norms of W + scale * B @ A, as peft initialises the magnitude."""
            w = self._dequantized_weight().astype(mx.float32)
            return mx.linalg.norm(w + (self.scale * self.lora_b.T) @ self.lora_a.T, axis=1)

        def __call__(self, x: mx.array) -> mx.array:
            w = self._dequantized_weight()
            adapted = w + (self.scale * self.lora_b.T) @ self.lora_a.T
            g = (self.m / mx.stop_gradient(mx.linalg.norm(adapted, axis=1))).astype(x.dtype)
            y = x @ w.T
            if self.training and getattr(self, "dropout_p", 0.0) > 0:
                xd = self.dropout(x)
                lora = (self.scale * ((xd @ self.lora_a) @ self.lora_b)).astype(x.dtype)
                out = y + (g - 1) * (xd @ w.T) + g * lora
            else:
                out = g * (y + (self.scale * ((x @ self.lora_a) @ self.lora_b)).astype(x.dtype))
            if "bias" in self.linear:
                out = out + self.linear.bias
            return out

    _DORA.append(PeftDoRALinear)
    return PeftDoRALinear


# ------------------------------------------------------------------ the LoRA/DoRA adapter


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(file)).items()}


class LoraAdapter:
    """LoRA (``LoRALinear``) or DoRA (:func:`_dora_class`) layers wrapping the recipe's target
    modules in the blocks ``layers``, saved in mlx-lm's format."""

    def __init__(self, model: nn.Module, adapter: AdapterConfig, layers: list[int], base: dict[str, str]) -> None:
        """Wrap the layers (MlxtuneError for a block out of range). ``adapter``: the recipe's
        ``[adapter]``; ``base``: base_model, model_type and quantization for adapter_config.json."""
        from mlx_lm.tuner.lora import LoRALinear

        self.model, self.adapter, self.layers, self.base = model, adapter, list(layers), base
        self.dora = adapter.method == "dora"
        wrap = _dora_class().wrap if self.dora else LoRALinear.from_base
        self.modules: dict[str, nn.Module] = {}  # HF module path -> LoRALinear or (DoRA) PeftDoRALinear
        blocks, targets = model.model.layers, set(adapter.target_modules)
        for i in layers:
            if not 0 <= i < len(blocks):
                raise MlxtuneError(f"adapter layer {i} out of range (the model has {len(blocks)} blocks)")
            new = []
            for rel, mod in blocks[i].named_modules():
                if rel.rsplit(".", 1)[-1] in targets and isinstance(mod, LINEAR_TYPES):
                    lora = wrap(mod, r=adapter.rank, dropout=adapter.dropout, scale=adapter.scale)
                    new.append((rel, lora))
                    self.modules[f"model.layers.{i}.{rel}"] = lora
            blocks[i].update_modules(tree_unflatten(new))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {p: (int(m.lora_a.shape[0]), int(m.lora_b.shape[1])) for p, m in self.modules.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        """LoRA A/B (and DoRA magnitudes); DoRA without magnitudes initialises them from the base."""
        has_mag = check_weight_keys(weights, self.modules, self.dora)
        for p, m in self.modules.items():
            a = np.asarray(weights[f"{p}.lora_A"], dtype=np.float32).T
            b = np.asarray(weights[f"{p}.lora_B"], dtype=np.float32).T
            if a.shape != tuple(m.lora_a.shape) or b.shape != tuple(m.lora_b.shape):
                raise ValueError(f"{p}: adapter shapes {a.T.shape}/{b.T.shape} do not fit (rank, in)/(out, rank) = {tuple(m.lora_a.shape)[::-1]}/{tuple(m.lora_b.shape)[::-1]}")
            m.lora_a = mx.array(np.ascontiguousarray(a))
            m.lora_b = mx.array(np.ascontiguousarray(b))
            if self.dora and has_mag:
                mag = np.asarray(weights[f"{p}.{MAGNITUDE}"], dtype=np.float32)
                if mag.shape != tuple(m.m.shape):
                    raise ValueError(f"{p}: DoRA magnitude shape {mag.shape} does not fit (out,) = {tuple(m.m.shape)}")
                m.m = mx.array(mag)
            elif self.dora:
                m.m = m.magnitude_init()
        mx.eval([(m.lora_a, m.lora_b, m.m if self.dora else m.lora_a) for m in self.modules.values()])

    def get_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for p, m in self.modules.items():
            out[f"{p}.lora_A"] = np.array(m.lora_a.astype(mx.float32)).T.copy()
            out[f"{p}.lora_B"] = np.array(m.lora_b.astype(mx.float32)).T.copy()
            if self.dora:
                out[f"{p}.{MAGNITUDE}"] = np.array(m.m.astype(mx.float32))
        return out

    def _config(self) -> dict[str, Any]:
        """adapter_config.json in mlx-lm's layout, with what mlxtune needs under "mlxtune"."""
        n_blocks = len(self.model.model.layers)
        keys = sorted({p.split(".", 3)[3] for p in self.modules})
        a = self.adapter
        return {
            "fine_tune_type": "dora" if self.dora else "lora",
            # mlx-lm wraps the last `num_layers` blocks; blocks in that range that mlxtune did
            # not adapt get mlx-lm's fresh LoRA with lora_b = 0, i.e. no change to the output.
            "num_layers": n_blocks - min(self.layers) if self.layers else 0,
            "lora_parameters": {"rank": a.rank, "scale": a.scale, "dropout": a.dropout, "keys": keys},
            "mlxtune": {
                "alpha": a.alpha,
                "layers": self.layers,
                "target_modules": list(a.target_modules),
                "base_model": self.base["base_model"],
                "model_type": self.base["model_type"],
                "method": a.method,
                "quantization": self.base["quantization"],
            },
        }

    def save(self, path: Path) -> None:
        """mlx-lm's ``adapters.safetensors`` (``lora_a`` (in, r), ``lora_b`` (r, out), DoRA's ``m``)
        and ``adapter_config.json``: loadable by ``mlx_lm``'s own loader; and PEFT's format in
        ``path/peft`` (:func:`mlxtune.adapters.lora.write_peft`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for p, m in self.modules.items():
            tensors[f"{p}.lora_a"] = m.lora_a
            tensors[f"{p}.lora_b"] = m.lora_b
            if self.dora:
                tensors[f"{p}.m"] = m.m  # mlx-lm's name for DoRA's magnitude
        mx.save_safetensors(str(path / "adapters.safetensors"), tensors, metadata={"format": "mlx"})
        (path / "adapter_config.json").write_text(json.dumps(self._config(), indent=2) + "\n", encoding="utf-8")
        a = self.adapter
        write_peft(path / PEFT_DIR, self.get_weights(), LoraSpec(a.rank, a.alpha, a.dropout, self.dora, list(a.target_modules),
                                                                 len(self.model.model.layers), self.base["base_model"]))

    def load(self, path: Path) -> None:
        """An adapter folder in mlx-lm's format (``adapters.safetensors``, as written by :meth:`save`
        or ``mlx_lm.lora``) or in PEFT's (``adapter_model.safetensors``, as written by the torch
        backend), so an adapter trained on one backend runs on the other."""
        self.set_weights(load_lora_folder(Path(path), self.adapter, self.modules, _read_safetensors))

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The frozen linears put back in place of the LoRA/DoRA layers meanwhile."""
        layers = self.model.model.layers
        swapped = []
        for p, m in self.modules.items():
            i, rel = p.split(".", 3)[2:]
            swapped.append((int(i), rel, m))
            layers[int(i)].update_modules(tree_unflatten([(rel, m.linear)]))
        try:
            yield
        finally:
            for i, rel, m in swapped:
                layers[i].update_modules(tree_unflatten([(rel, m)]))

    def hidden(self, model: nn.Module, inputs: mx.array) -> mx.array:
        return base_hidden(model, inputs)

    def generation_cache(self, model: nn.Module, padding: np.ndarray) -> list[Any]:
        return base_generation_cache(model, padding)
