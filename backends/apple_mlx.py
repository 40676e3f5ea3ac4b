"""The MLX backend: mlx + mlx-lm (Metal on Apple Silicon, CPU on Linux).

Parity with the torch backend (DESIGN.md section 5) rests on these choices:

- **Same model.** The model config is taken from transformers' own reading of ``config.json``
  (``AutoConfig``) and passed to mlx-lm field by field, so fields that the two libraries read
  differently cannot drift: transformers 5 writes ``rope_parameters`` while mlx-lm 0.32 reads
  only ``rope_theta`` and silently falls back to 10000. After building the model, every field is
  checked against the expected value, and architectures or rope types this backend has not been
  checked on are refused with a clear message (:data:`SUPPORTED_ARCHITECTURES`).
- **Same adapter.** mlx-lm's ``LoRALinear`` on the recipe's modules in the recipe's blocks, with
  ``scale = alpha / rank`` (not mlx-lm's default 20) and the recipe's dropout; the initial
  weights come from the core (``set_adapter_weights``; mlx-lm keeps ``lora_a`` as (in, r) and
  ``lora_b`` as (r, out), the transposes of PEFT's ``lora_A``/``lora_B``).
- **DoRA** (``adapter.method = "dora"``): mlx-lm's ``DoRALinear`` with peft's arithmetic, checked
  against peft in the tests: output ``g * (W x + s B A x) + bias`` with ``g = m / ||W + s B A||``
  per output row, the norm detached (not differentiated), ``m`` initialised to the row norms of
  ``W + s B A`` (of W, as B starts at 0). With dropout, peft feeds the dropped input to the
  magnitude-scaled part only: ``W x + (g - 1) W drop(x) + g s B A drop(x)``, where mlx-lm writes
  ``g (W x + s B A drop(x))``; :func:`_dora_class` follows peft. ``m`` crosses the backend
  boundary as ``<module>.lora_magnitude`` and is saved as mlx-lm's ``<module>.m``.
- **Prompt / prefix tuning** (``adapter.method = "prompt" | "prefix"``): no LoRA layers; PEFT's
  maths implemented in ``backends/mlx_virtual.py`` (virtual embeddings before the tokens, or
  per-layer key/value prefixes in the attention cache), saved in PEFT's format.
- **Quantized base** (``qlora``, or ``model.quantize_bits`` > 0): after loading, every layer with
  ``to_quantized`` (the projections, the embedding, the head, as the memory planner assumes) is
  quantized with ``mlx.nn.quantize`` (affine, ``quantize_bits``, ``quantize_group_size``), then
  the adapters wrap the ``QuantizedLinear`` layers; a folder already quantized by mlx-lm
  (``"quantization"`` in config.json) is loaded as it is. Base-model passes ("adapter off") use
  the same quantized layers. MLX's quantized matmuls are slow on the CPU (a few GFLOP/s).
- **Same loss.** ``logits[:, :-1]`` against ``tokens[:, 1:]`` weighted by ``mask[:, 1:]``,
  cross-entropy in float32, summed; the step differentiates ``sum / denom`` and accumulates
  gradients over micro-batches, so the loss is token-weighted across the accumulation window.
  As on torch, only the hidden states of masked positions go through the head, in chunks of
  :func:`mlxtune.planning.memory.ce_chunk_rows` rows (see :func:`_loss`): full B x T x V logits never exist.
- **Same optimizer.** ``mlx.optimizers.AdamW`` with ``bias_correction=True`` (MLX defaults to
  False) and decoupled weight decay ``p *= 1 - lr * wd`` (as ``torch.optim.AdamW``), global-norm
  clipping with ``clip_grad_norm`` (same formula as ``torch.nn.utils.clip_grad_norm_``), the
  learning rate set from the loop's schedule at every update.

The forward/backward of a micro-batch and the optimizer update are compiled with ``mx.compile``
on the GPU; on the CPU compiling gave no speed-up (matmuls dominate) and costs one new trace per
sequence length, so it is off there. ``MLXTUNE_MLX_COMPILE=1`` or ``0`` forces either way; the
tests check that both give the same numbers.

Differences from raw ``mlx_lm.lora`` a user comparing against it would see: mlx-lm's own
batcher sorts chat records by the size of the record dict (so its "length sort" does nothing for
them) and its mask trains one extra position (a pad after the last token); here the core's data
layer and batcher decide the order and the mask for both backends, and a padded position is
never a target. mlx-lm also uses ``scale = 20`` and Adam without bias correction by default.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from mlxtune.adapters.lora import MAGNITUDE, check_adapter, check_weight_keys, read_adapter
from mlxtune.errors import MlxtuneError
from mlxtune.errors import OutOfMemory, is_out_of_memory
from mlxtune.planning.memory import ce_chunk_rows
from mlxtune.models.source import read_config
from mlxtune.models.quantization import base_bits, mlx_label
from mlxtune.recipe.schema import VIRTUAL_METHODS
from mlxtune.adapters.virtual import VirtualSpec, load_virtual, save_virtual

from .mlx_virtual import VirtualTokens
from .mlx_virtual import attach as attach_virtual
from .mlx_virtual import body as virtual_body
from .mlx_virtual import generation_cache as virtual_generation_cache

if TYPE_CHECKING:
    from mlxtune.recipe.schema import Recipe

# model_type -> fields mlx-lm's ModelArgs reads that must equal transformers' values.
_COMMON = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": _COMMON + ("head_dim", "attention_bias", "mlp_bias"),
    "qwen2": _COMMON,
    "qwen3": _COMMON + ("head_dim",),
}
# rope types whose mlx-lm implementation matches transformers' (checked by the tests).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# ------------------------------------------------------------------ model config


def _hf_config(model_dir: Path) -> Any:
    try:
        from transformers import AutoConfig
    except ImportError:
        raise MlxtuneError(
            "the mlx backend reads the model config with transformers, which is not installed: "
            "pip install 'mlxtune[mlx]'"
        ) from None
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many kinds here
        raise MlxtuneError(f"{model_dir}/config.json: transformers cannot read it: {e}") from None


def _rope(hf: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling in mlx-lm's format or None) as transformers reads them."""
    rp = getattr(hf, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        params = dict(rp)
    else:  # transformers 4 layout
        params = dict(getattr(hf, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(hf, "rope_theta", None)
    theta = params.pop("rope_theta", None)
    if theta is None:
        raise MlxtuneError("the model config has no rope_theta (neither top level nor in rope_parameters)")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MlxtuneError(
            f"rope type {rope_type!r} is not supported by mlxtune's mlx backend yet "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)}); use --backend torch"
        )
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    params.pop("type", None)
    return float(theta), params


def mlx_model_config(model_dir: Path) -> tuple[str, dict[str, Any]]:
    """(model_type, overrides for mlx-lm's ModelArgs) so that mlx-lm builds the model exactly
    as transformers reads ``config.json``. Raises MlxtuneError for anything not supported."""
    raw_path = Path(model_dir) / "config.json"
    if not raw_path.is_file():
        raise MlxtuneError(f"{model_dir}: no config.json (expected a Hugging Face model folder)")
    raw = json.loads(raw_path.read_text(encoding="utf-8"))
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise MlxtuneError(
            f"{raw_path}: model_type {model_type!r} is not supported by mlxtune's mlx backend "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}; each one is checked against "
            "transformers' logits in the test suite); use --backend torch"
        )
    if "quantization_config" in raw and "quantization" not in raw:  # mlx-lm writes both; HF formats (GPTQ, AWQ, bnb) only the second
        method = (raw["quantization_config"] or {}).get("quant_method", "unknown")
        raise MlxtuneError(f"{raw_path}: a {method}-quantized checkpoint cannot be trained by the mlx backend; name the "
                           "unquantized model and set model.quantize_bits (quantized at load), or an mlx-lm quantized folder")
    hf = _hf_config(model_dir)
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise MlxtuneError(f"{raw_path}: hidden_act {act!r} is not supported by the mlx backend (silu only)")
    layer_types = getattr(hf, "layer_types", None)
    if getattr(hf, "use_sliding_window", False) or (layer_types and any(t != "full_attention" for t in layer_types)):
        raise MlxtuneError(f"{raw_path}: sliding-window attention is not supported by the mlx backend yet")
    cfg: dict[str, Any] = {"model_type": model_type}
    for name in SUPPORTED_ARCHITECTURES[model_type]:
        value = getattr(hf, name, None)
        if name == "head_dim" and value is None:
            value = hf.hidden_size // hf.num_attention_heads
        if name == "num_key_value_heads" and value is None:
            value = hf.num_attention_heads
        if value is None:
            raise MlxtuneError(f"{raw_path}: transformers reads no value for {name!r}")
        cfg[name] = value
    if model_type == "qwen2":
        hd = getattr(hf, "head_dim", None)
        if hd is not None and hd != hf.hidden_size // hf.num_attention_heads:
            raise MlxtuneError(f"{raw_path}: head_dim {hd} != hidden_size / num_attention_heads, not supported for qwen2 by mlx-lm")
    if model_type == "qwen3" and getattr(hf, "attention_bias", False):
        raise MlxtuneError(f"{raw_path}: qwen3 with attention_bias is not supported by mlx-lm")
    if model_type == "llama" and getattr(hf, "pretraining_tp", 1) not in (1, None):
        raise MlxtuneError(f"{raw_path}: pretraining_tp != 1 is not supported")
    theta, scaling = _rope(hf)
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = scaling
    if model_type in ("llama", "qwen2"):
        cfg["rope_traditional"] = False
    if model_type == "llama":
        cfg["layer_types"] = None
        cfg["sliding_window"] = None
    if model_type == "qwen3":
        cfg["rope_parameters"] = None
    return model_type, cfg


def _check_model_args(args: Any, expected: dict[str, Any], where: Path) -> None:
    bad = []
    for name, want in expected.items():
        if name in ("layer_types", "rope_parameters"):
            continue
        have = getattr(args, name, "<absent>")
        if isinstance(want, float) or isinstance(have, float):
            ok = isinstance(have, (int, float)) and math.isclose(float(have), float(want), rel_tol=1e-9)
        else:
            ok = have == want
        if not ok:
            bad.append(f"{name}: mlx-lm has {have!r}, transformers reads {want!r}")
    if bad:
        raise MlxtuneError(f"{where}: mlx-lm and transformers read the model config differently: " + "; ".join(bad))


# ------------------------------------------------------------------ the backend


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


def _rows(model: nn.Module, inputs: mx.array, rows: mx.array) -> mx.array:
    """Final hidden states [len(rows), d] of the selected positions: the head runs on these only."""
    h = virtual_body(model, inputs)  # model.model(inputs), behind the prompt/prefix if there is one
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


def _loss(model: nn.Module, inputs: mx.array, rows: mx.array, targets: mx.array, weights: mx.array,
          inv_denom: mx.array, chunk: int):
    """(sum(NLL * weights) * inv_denom, sum(NLL * weights)) with a chunked cross-entropy.

    The head is frozen, so each chunk's gradient with respect to its hidden states is formed
    where its logits are: ``(softmax @ W - W[target]) * weight`` (the head's vjp of the softmax,
    minus the target's row) and packed with the chunk's loss into one array. A chunk's logits
    are dead once that array exists; the next chunk waits for it (a zero-valued dependency), so
    MLX's scheduler cannot start every chunk at once. ``h * stop_gradient(dh)`` minus its own
    stopped value is exactly 0 and carries that gradient into the body's backward pass.
    """
    h = _rows(model, inputs, rows)
    head, d = _head(model), h.shape[-1]
    hs = mx.stop_gradient(h)
    nll, grads, prev = [], [], None
    for s in range(0, h.shape[0], chunk):
        hc, t, w = hs[s:s + chunk], targets[s:s + chunk], weights[s:s + chunk]
        if prev is not None:
            hc = hc + (0 * prev).astype(hc.dtype)
        logits = head(hc).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        ce = (lse[:, 0] - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]) * w
        _, (dh,) = mx.vjp(head, [hc], [mx.exp(logits - lse).astype(hc.dtype)])
        dh = (dh - _head_rows(model, t)).astype(mx.float32) * w[:, None]
        packed = mx.concatenate([dh.reshape(-1), ce.sum()[None]])
        prev = packed[-1]
        nll.append(prev)
        grads.append(packed[:-1].reshape(-1, d))
    total = mx.stack(nll).sum()
    carrier = (h * mx.stop_gradient(mx.concatenate(grads)).astype(h.dtype)).sum()
    value = total + (carrier - mx.stop_gradient(carrier)).astype(mx.float32)
    return value * inv_denom, total


_CHECKPOINTED: dict[type, type] = {}


def _checkpoint_blocks(blocks: list[nn.Module]) -> None:
    """Gradient checkpointing: each block's call runs under ``mx.checkpoint``, so its activations
    are recomputed during backward instead of kept. Done by giving each block a subclass of its
    own class (parameter names unchanged); mlx-lm's ``grad_checkpoint`` patches the class itself,
    which would change every model of that class in the process."""
    for block in blocks:
        cls = type(block)
        if cls in _CHECKPOINTED.values():
            continue
        if cls not in _CHECKPOINTED:
            call = cls.__call__

            def checkpointed(self, *args, _call=call, **kwargs):
                def inner(params, *a, **kw):
                    self.update(params)
                    return _call(self, *a, **kw)

                return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

            _CHECKPOINTED[cls] = type(cls.__name__ + "Checkpointed", (cls,), {"__call__": checkpointed})
        block.__class__ = _CHECKPOINTED[cls]


def _compile_default() -> bool:
    """``MLXTUNE_MLX_COMPILE=1/0`` forces it; by default compile on the GPU (Metal) only.

    Measured on the CPU (SmolLM2-135M LoRA, OpenBLAS, 2 cores): 84-90 tokens/s compiled vs
    91-93 not, because the matmuls dominate, while every new sequence length costs a new trace
    (~0.3 s) and length bucketing produces many lengths.
    """
    env = os.environ.get("MLXTUNE_MLX_COMPILE", "").strip().lower()
    if env:
        return env not in ("0", "false", "no", "off")
    return mx.default_device().type == mx.gpu


_DORA: list[type] = []


def _dora_class() -> type:
    """mlx-lm's ``DoRALinear`` computing what peft's DoRA computes (module docstring), built on
    first use because importing mlx_lm takes seconds."""
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


def _quantize_base(model: nn.Module, bits: int, group_size: int, where: Path) -> None:
    """Affine quantization of every layer that has ``to_quantized`` (linear layers, embedding,
    head: what mlxtune/planning/memory.py counts), refusing layers whose input size is not a multiple of
    the group size rather than leaving them in full precision unannounced."""
    layers = [(p, m) for p, m in model.named_modules() if hasattr(m, "to_quantized") and "weight" in m]
    bad = sorted({int(m.weight.shape[-1]) for _, m in layers if m.weight.shape[-1] % group_size})
    if bad:
        raise MlxtuneError(f"{where}: model.quantize_group_size = {group_size} does not divide the input size {bad[0]} of "
                           f"some layers (e.g. {next(p for p, m in layers if m.weight.shape[-1] == bad[0])}); "
                           f"use a group size that divides {', '.join(map(str, bad))} (32 or 64)")
    nn.quantize(model, group_size=group_size, bits=bits, mode="affine")


class MLXBackend:
    """LoRA, DoRA and QLoRA on mlx-lm models; see the module docstring for the parity rules."""

    name = "mlx"

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.recipe: Recipe | None = None
        self.model_dir: Path | None = None
        self.model_type = ""
        self.layers: list[int] = []
        self.lora: dict[str, nn.Module] = {}  # HF module path -> LoRALinear or (DoRA) PeftDoRALinear
        self.dora = False
        self.quantization = "none"  # what describe() and the run's report say
        self.virtual: VirtualTokens | None = None  # prompt/prefix tuning (backends/mlx_virtual.py)
        self.optimizer: optim.AdamW | None = None
        self.grad_clip = 0.0
        self.last_grad_norm: float | None = None
        self._grads: Any = None
        self._step_fn: Any = None
        self._update_fn: Any = None
        self.compile = _compile_default()

    # ---------------------------------------------------------------- load

    def load(self, model_dir: Path, recipe: Recipe, layers: list[int]) -> None:
        from mlx_lm.tuner.lora import LoRALinear
        from mlx_lm.utils import load_model

        model_dir = Path(model_dir)
        model_type, cfg = mlx_model_config(model_dir)
        if not list(model_dir.glob("model*.safetensors")):
            raise MlxtuneError(f"{model_dir}: no model*.safetensors weights (the mlx backend loads safetensors only)")
        mx.random.seed(recipe.train.seed)
        mx.reset_peak_memory()
        try:
            model, _ = load_model(model_dir, model_config=cfg, strict=True)
        except (ValueError, KeyError) as e:
            raise MlxtuneError(f"{model_dir}: mlx-lm cannot load the weights: {e}") from None
        _check_model_args(model.args, cfg, model_dir)
        model.set_dtype(getattr(mx, recipe.model.dtype))  # the recipe's names are mx dtype names
        bits, group = base_bits(recipe), recipe.model.quantize_group_size
        found = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("quantization")
        if found:  # quantized by mlx-lm: mlx-lm's loader built QuantizedLinear layers
            fb, fg, mode = found.get("bits"), found.get("group_size"), found.get("mode", "affine")
            if bits and (bits, group) != (fb, fg):
                raise MlxtuneError(f"{model_dir}/config.json: the model is already quantized ({mode} {fb}-bit, group {fg}) "
                                   f"but the recipe asks for {bits}-bit, group {group}; set model.quantize_bits = {fb} and "
                                   f"model.quantize_group_size = {fg}, or name the unquantized model")
            quantization = mlx_label(fb, fg, mode) + " (already quantized in the model folder)"
        elif bits:
            _quantize_base(model, bits, group, model_dir)
            quantization = mlx_label(bits, group) + " (quantized at load)"
        else:
            quantization = "none"
        model.freeze()

        blocks = model.model.layers
        targets = set(recipe.adapter.target_modules)
        linear_types = (nn.Linear, nn.QuantizedLinear)
        available = {r.rsplit(".", 1)[-1] for r, m in blocks[0].named_modules() if isinstance(m, linear_types)}
        missing = targets - available
        if missing:
            raise MlxtuneError(
                f"adapter.target_modules: {sorted(missing)} not found in the model's blocks; "
                f"linear layers there: {', '.join(sorted(available))}"
            )
        self.lora = {}
        if recipe.adapter.method in VIRTUAL_METHODS:  # no LoRA layers: virtual tokens (backends/mlx_virtual.py)
            layers = []
        dora = recipe.adapter.method == "dora"
        wrap = _dora_class().wrap if dora else LoRALinear.from_base
        for i in layers:
            if not 0 <= i < len(blocks):
                raise MlxtuneError(f"adapter layer {i} out of range (the model has {len(blocks)} blocks)")
            new = []
            for rel, mod in blocks[i].named_modules():
                if rel.rsplit(".", 1)[-1] in targets and isinstance(mod, linear_types):
                    lora = wrap(mod, r=recipe.adapter.rank, dropout=recipe.adapter.dropout, scale=recipe.adapter.scale)
                    new.append((rel, lora))
                    self.lora[f"model.layers.{i}.{rel}"] = lora
            blocks[i].update_modules(tree_unflatten(new))
        if recipe.train.grad_checkpointing is True and recipe.adapter.method == "prefix":
            raise MlxtuneError('adapter.method = "prefix" does not work with gradient checkpointing (the prefix is '
                               "in the attention cache); set train.grad_checkpointing = false")
        if recipe.train.grad_checkpointing is True:  # "auto" is resolved by the planner before load
            _checkpoint_blocks(blocks)
        self.virtual = None
        if recipe.adapter.method in VIRTUAL_METHODS:
            self.virtual = attach_virtual(model, VirtualSpec.from_config(read_config(model_dir), recipe.adapter))
        mx.eval(model.parameters())
        self.model, self.recipe, self.model_dir = model, recipe, model_dir
        self.model_type, self.layers = model_type, list(layers)
        self.dora, self.quantization = dora, quantization
        self._grads = None
        self._step_fn = self._update_fn = None
        self.optimizer = None

    def _need(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("MLXBackend: call load() first")
        return self.model

    # ---------------------------------------------------------------- adapter weights

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """LoRA: module path -> (in, out); prompt/prefix: weight name -> shape (mlxtune/adapters/virtual.py)."""
        self._need()
        if self.virtual is not None:
            return self.virtual.spec.shapes()
        return {p: (int(m.lora_a.shape[0]), int(m.lora_b.shape[1])) for p, m in self.lora.items()}

    def set_adapter_weights(self, weights: dict[str, np.ndarray]) -> None:
        """LoRA A/B (and DoRA magnitudes); DoRA without magnitudes initialises them from the base."""
        self._need()
        if self.virtual is not None:
            return self.virtual.set_weights(weights)
        has_mag = check_weight_keys(weights, self.lora, self.dora)
        for p, m in self.lora.items():
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
        mx.eval([(m.lora_a, m.lora_b, m.m if self.dora else m.lora_a) for m in self.lora.values()])

    def get_adapter_weights(self) -> dict[str, np.ndarray]:
        self._need()
        if self.virtual is not None:
            return self.virtual.get_weights()
        out = {}
        for p, m in self.lora.items():
            out[f"{p}.lora_A"] = np.array(m.lora_a.astype(mx.float32)).T.copy()
            out[f"{p}.lora_B"] = np.array(m.lora_b.astype(mx.float32)).T.copy()
            if self.dora:
                out[f"{p}.{MAGNITUDE}"] = np.array(m.m.astype(mx.float32))
        return out

    def trainable_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self._need().trainable_parameters()))

    # ---------------------------------------------------------------- training

    def setup_optimizer(self, recipe: Recipe) -> None:
        model = self._need()
        t = recipe.train
        self.optimizer = optim.AdamW(
            learning_rate=t.lr,
            betas=list(t.betas),
            eps=t.eps,
            weight_decay=t.weight_decay,
            bias_correction=True,
        )
        self.optimizer.init(model.trainable_parameters())
        self.grad_clip = float(t.grad_clip)
        self._grads = None
        self._build_fns()

    def _build_fns(self) -> None:
        model, opt = self._need(), self.optimizer
        value_and_grad = nn.value_and_grad(model, _loss)
        grad_clip = self.grad_clip

        chunk = ce_chunk_rows(model.args.vocab_size)

        def step(inputs, rows, targets, weights, inv_denom):
            (_, nll), grads = value_and_grad(model, inputs, rows, targets, weights, inv_denom, chunk)
            return nll, grads

        def update(grads):
            if grad_clip > 0:
                grads, norm = optim.clip_grad_norm(grads, grad_clip)
            else:
                norm = mx.sqrt(sum((g.astype(mx.float32).square().sum() for _, g in tree_flatten(grads)), mx.array(0.0)))
            opt.update(model, grads)
            return norm

        if self.compile:
            # nn.value_and_grad writes the (traced) trainable arrays into the model, so the model
            # state has to be an output as well as an input.
            state = [model.state, mx.random.state]
            step = mx.compile(step, inputs=state, outputs=state)
            ustate = [model.state, opt.state]
            update = mx.compile(update, inputs=ustate, outputs=ustate)
        self._step_fn, self._update_fn = step, update

    def train_step(self, tokens: np.ndarray, mask: np.ndarray, denom: int, update: bool, lr: float) -> float:
        model = self._need()
        if self.optimizer is None or self._step_fn is None:
            raise RuntimeError("MLXBackend: call setup_optimizer() before train_step()")
        if denom <= 0:
            raise ValueError("denom (target tokens in the accumulation window) must be > 0")
        model.train()
        try:
            nll, grads = self._step_fn(*_targets(tokens, mask), mx.array(1.0 / denom, dtype=mx.float32))
            self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
            mx.eval(nll, self._grads)
        except (RuntimeError, MemoryError) as e:  # an allocation failure the CPU allocator reports
            self._grads = None  # the accumulation window is retried from its start (Metal aborts instead)
            if is_out_of_memory(e) or isinstance(e, MemoryError):
                raise OutOfMemory(f"mlx: {str(e).splitlines()[0] if str(e) else 'allocation failed'}") from None
            raise
        if update:
            self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
            norm = self._update_fn(self._grads)
            mx.eval(norm, model.trainable_parameters(), self.optimizer.state)
            self.last_grad_norm = float(norm)
            self._grads = None
        return float(nll)

    # ---------------------------------------------------------------- eval

    def eval_step(self, tokens: np.ndarray, masks: dict[str, np.ndarray], adapter: bool = True) -> dict[str, float]:
        model = self._need()
        model.eval()
        names = list(masks)
        # one pass over the union of the masks; each mask then weights its own rows
        union = np.logical_or.reduce([np.asarray(masks[n], dtype=bool) for n in names])
        inputs, rows, targets, _ = _targets(tokens, union)
        picked = union[:, 1:]
        weights = {n: np.asarray(masks[n], dtype=bool)[:, 1:][picked].astype(np.float32) for n in names}
        with nullcontext() if adapter else self._base_model():
            ce = _nll_rows(_head(model), _rows(model, inputs, rows), targets, ce_chunk_rows(model.args.vocab_size))
            n = int(picked.sum())
            sums = {k: (ce[:n] * mx.array(w)).sum() for k, w in weights.items()}
            mx.eval(sums)
        return {k: float(v) for k, v in sums.items()}

    # ---------------------------------------------------------------- adapters on disk

    def _adapter_config(self) -> dict[str, Any]:
        assert self.recipe is not None
        n_blocks = len(self._need().model.layers)
        keys = sorted({p.split(".", 3)[3] for p in self.lora})
        a = self.recipe.adapter
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
                "base_model": str(self.model_dir),
                "model_type": self.model_type,
                "method": a.method,
                "quantization": self.quantization,
            },
        }

    def save_adapter(self, path: Path) -> None:
        self._need()
        if self.virtual is not None:  # mlx-lm has no format for these: PEFT's, as the torch backend writes
            return save_virtual(Path(path), self.virtual.spec, self.virtual.get_weights(), str(self.model_dir))
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for p, m in self.lora.items():
            tensors[f"{p}.lora_a"] = m.lora_a
            tensors[f"{p}.lora_b"] = m.lora_b
            if self.dora:
                tensors[f"{p}.m"] = m.m  # mlx-lm's name for DoRA's magnitude
        mx.save_safetensors(str(path / "adapters.safetensors"), tensors, metadata={"format": "mlx"})
        (path / "adapter_config.json").write_text(json.dumps(self._adapter_config(), indent=2) + "\n", encoding="utf-8")

    def load_adapter(self, path: Path) -> None:
        """Load an adapter folder in mlx-lm's format (``adapters.safetensors``, as written by
        :meth:`save_adapter` or ``mlx_lm.lora``) or in PEFT's (``adapter_model.safetensors``, as
        written by the torch backend), so an adapter trained on one backend runs on the other."""
        self._need()
        assert self.recipe is not None
        if self.virtual is not None:
            return self.virtual.set_weights(load_virtual(Path(path), self.virtual.spec))
        a = self.recipe.adapter
        af = read_adapter(Path(path), lambda f: {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()})
        check_adapter(af, Path(path), a.method, a.rank, a.scale, self.lora)
        self.set_adapter_weights(af.weights)

    # ---------------------------------------------------------------- optimizer state

    def save_optimizer(self, path: Path) -> None:
        if self.optimizer is None:
            raise RuntimeError("MLXBackend: no optimizer to save")
        path = Path(path)
        flat = dict(tree_flatten(self.optimizer.state))
        step = int(self.optimizer.state["step"].item())
        tmp = path.with_name(path.name + ".tmp")
        mx.save_safetensors(str(tmp), flat, metadata={"step": str(step), "format": "mlxtune-mlx-adamw"})
        os.replace(str(tmp) + ".safetensors", path)

    def load_optimizer(self, path: Path) -> None:
        if self.optimizer is None:
            raise RuntimeError("MLXBackend: call setup_optimizer() before load_optimizer()")
        loaded = mx.load(str(path), format="safetensors")
        have = dict(tree_flatten(self.optimizer.state))
        if set(loaded) != set(have):
            raise MlxtuneError(f"{path}: optimizer state does not match this adapter ({len(loaded)} tensors, expected {len(have)})")
        self.optimizer.state = tree_map_with_path(lambda k, v: loaded[k], self.optimizer.state)
        mx.eval(self.optimizer.state)
        self._build_fns()  # the compiled update captured the previous state object

    # ---------------------------------------------------------------- generation

    @contextmanager
    def _base_model(self) -> Iterator[None]:
        """The base model meanwhile: the frozen linears put back in place of the LoRA/DoRA
        layers, and the virtual tokens (prompt/prefix) switched off."""
        model = self._need()
        swapped = []
        for p, m in self.lora.items():
            i, rel = p.split(".", 3)[2:]
            swapped.append((int(i), rel, m))
            model.model.layers[int(i)].update_modules(tree_unflatten([(rel, m.linear)]))
        if self.virtual is not None:
            self.virtual.enabled = False
        try:
            yield
        finally:
            for i, rel, m in swapped:
                model.model.layers[i].update_modules(tree_unflatten([(rel, m)]))
            if self.virtual is not None:
                self.virtual.enabled = True

    def _last_logits(self, inputs: mx.array, cache: list[Any]) -> np.ndarray:
        """float32 logits of the last position only: the vocabulary projection of the whole
        prompt would cost B * T * V floats for nothing."""
        model = self._need()
        h = model.model(inputs, cache=cache)[:, -1, :]
        return np.array(_head(model)(h).astype(mx.float32))

    def generate(self, prompts: list[np.ndarray], max_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0, adapter: bool = True,
                 should_stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Batched generation with mlx-lm's ``BatchKVCache`` (see ``Backend.generate``).

        The cache takes the left padding per row: its mask hides the pads and its per-row rope
        offset starts every row's real tokens at position 0, so padding does not change a row.
        Finished rows are filtered out of the cache. Eval mode (no dropout) while generating.
        """
        from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

        from mlxtune.evaluation.generation import check_sampling, decode_loop, left_pad

        model = self._need()
        check_sampling(temperature, top_p)
        if not prompts or max_tokens < 1:
            return [[] for _ in prompts]
        kinds = {type(c).__name__ for c in make_prompt_cache(model)}
        if kinds != {KVCache.__name__}:  # sliding-window or other caches: not checked here
            raise MlxtuneError(f"mlx backend: generation supports plain KV caches only, this model uses {sorted(kinds)}")
        ids, padding = left_pad(prompts, pad_id)
        cache = [BatchKVCache(padding.tolist()) for _ in model.layers]
        if adapter and self.virtual is not None:  # the prefix ahead of every row (backends/mlx_virtual.py)
            cache = virtual_generation_cache(model, padding)

        def step(tokens: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
            if keep is not None:
                rows = mx.array(keep.astype(np.int32))
                for c in cache:
                    c.filter(rows)
            return self._last_logits(mx.array(tokens.astype(np.int32))[:, None], cache)

        was_training = model.training
        model.eval()
        try:
            with nullcontext() if adapter else self._base_model():
                first = self._last_logits(mx.array(ids), cache)
                return decode_loop(first, step, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                   eos_ids=eos_ids, should_stop=should_stop)
        finally:
            model.train(was_training)

    # ---------------------------------------------------------------- reporting

    def peak_memory(self) -> int:
        """Peak bytes held by MLX's allocator since ``load`` (weights, activations, gradients,
        optimizer state; on a Mac this is unified memory; Python/numpy memory not included)."""
        return int(mx.get_peak_memory())

    def describe(self) -> dict[str, str]:
        import mlx_lm

        from mlxtune.system.blas import blas_summary

        dev = mx.default_device()
        device = "gpu (Metal)" if dev.type == mx.gpu and mx.metal.is_available() else str(dev.type).split(".")[-1]
        info = {
            "backend": "mlx",
            "device": device,
            "dtype": self.recipe.model.dtype if self.recipe else "",
            "quantization": self.quantization,
            "mlx": mx.__version__,
            "mlx_lm": getattr(mlx_lm, "__version__", "?"),
            "compiled": str(self.compile),
        }
        if dev.type == mx.cpu:
            info["blas"] = blas_summary()
        return info
