"""The MLX backend: mlx + mlx-lm (Metal on Apple Silicon, CPU on Linux).

Parity with the torch backend (DESIGN.md section 5) rests on these choices:

- **Same model.** The model config is taken from transformers' own reading of ``config.json``
  (``AutoConfig``) and passed to mlx-lm field by field, so fields that the two libraries read
  differently cannot drift: transformers 5 writes ``rope_parameters`` while mlx-lm 0.32 reads
  only ``rope_theta`` and silently falls back to 10000. After building the model, every field is
  checked against the expected value, and architectures or rope types this backend has not been
  checked on are refused with a clear message (``backends/mlx_config.py``).
- **Same adapter.** mlx-lm's ``LoRALinear`` on the recipe's modules in the recipe's blocks, with
  ``scale = alpha / rank`` (not mlx-lm's default 20) and the recipe's dropout; the initial
  weights come from the core (``set_adapter_weights``; mlx-lm keeps ``lora_a`` as (in, r) and
  ``lora_b`` as (r, out), the transposes of PEFT's ``lora_A``/``lora_B``).
- **DoRA** (``adapter.method = "dora"``): mlx-lm's ``DoRALinear`` with peft's arithmetic, checked
  against peft in the tests: output ``g * (W x + s B A x) + bias`` with ``g = m / ||W + s B A||``
  per output row, the norm detached (not differentiated), ``m`` initialised to the row norms of
  ``W + s B A`` (of W, as B starts at 0). With dropout, peft feeds the dropped input to the
  magnitude-scaled part only: ``W x + (g - 1) W drop(x) + g s B A drop(x)``, where mlx-lm writes
  ``g (W x + s B A drop(x))``; ``_dora_class`` (``backends/mlx_adapters.py``) follows peft. ``m``
  crosses the backend boundary as ``<module>.lora_magnitude`` and is saved as mlx-lm's ``<module>.m``.
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
  :func:`mlxtune.planning.memory.ce_chunk_rows` rows (``backends/mlx_loss.py``): full B x T x V
  logits never exist.
- **Same optimizer.** ``mlx.optimizers.AdamW`` with ``bias_correction=True`` (MLX defaults to
  False) and decoupled weight decay ``p *= 1 - lr * wd`` (as ``torch.optim.AdamW``), global-norm
  clipping with ``clip_grad_norm`` (same formula as ``torch.nn.utils.clip_grad_norm_``), the
  learning rate set from the loop's schedule at every update.

Each adapter method is one object behind ``backends/mlx_adapters.py``'s ``MLXAdapter``
(``LoraAdapter`` there, ``VirtualAdapter`` in ``backends/mlx_virtual.py``), chosen once in
:meth:`MLXBackend.load`; the base model is built in ``backends/mlx_model.py``.

The forward/backward of a micro-batch is compiled with ``mx.compile`` on the GPU; on the CPU
compiling it gave no speed-up (matmuls dominate) and costs one new trace per sequence length, so
it is off there. The optimizer update (clip + AdamW: hundreds of small elementwise kernels, fixed
shapes, one trace) is compiled on every device: 3x faster on the CPU (255 -> 80 ms for SmolLM2's
4.9M LoRA parameters), the same numbers. ``MLXTUNE_MLX_COMPILE=1`` or ``0`` forces both either
way; the tests check that both give the same numbers.

Dropout's masks come from MLX's global random stream, seeded before every forward pass from
(``train.seed``, optimizer steps done, pass in the accumulation window): MLX's key cannot be set
back to a saved value, and this way ``--resume`` draws the masks the uninterrupted run drew
(``MLXBackend._seeded``; ``tests/test_fault.py``).

Differences from raw ``mlx_lm.lora`` a user comparing against it would see: mlx-lm's own
batcher sorts chat records by the size of the record dict (so its "length sort" does nothing for
them) and its mask trains one extra position (a pad after the last token); here the core's data
layer and batcher decide the order and the mask for both backends, and a padded position is
never a target. mlx-lm also uses ``scale = 20`` and Adam without bias correction by default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_map_with_path, tree_unflatten

from mlxtune.adapters.virtual import VirtualSpec
from mlxtune.data.batching import mask_union
from mlxtune.errors import MlxtuneError, OutOfMemory, is_out_of_memory
from mlxtune.files import atomic_file
from mlxtune.planning.memory import ce_chunk_rows
from mlxtune.recipe.schema import VIRTUAL_METHODS
from mlxtune.training.dist import Dist, Launch, check_launch

from . import AdapterWeights
from .mlx_adapters import LoraAdapter, MLXAdapter, check_targets
from .mlx_loss import _head, _loss, _nll_rows, _rows, _targets
from .mlx_model import _checkpoint_blocks, load_base
from .mlx_virtual import VirtualAdapter

if TYPE_CHECKING:
    from mlxtune.recipe.schema import Recipe


def _compile_default() -> bool:
    """``MLXTUNE_MLX_COMPILE=1/0`` forces it; by default compile on the GPU (Metal) only.

    Measured on the CPU (SmolLM2-135M LoRA, OpenBLAS, 2 cores): 84-90 tokens/s compiled vs
    91-93 not, because the matmuls dominate, while every new sequence length costs a new trace
    (~0.3 s) and length bucketing produces many lengths.
    """
    forced = _compile_forced()
    return mx.default_device().type == mx.gpu if forced is None else forced


def _compile_update_default() -> bool:
    """The update is compiled unless ``MLXTUNE_MLX_COMPILE=0`` turns compiling off."""
    return _compile_forced() is not False


def _compile_forced() -> bool | None:
    """``MLXTUNE_MLX_COMPILE``: True/False when set, None when not."""
    env = os.environ.get("MLXTUNE_MLX_COMPILE", "").strip().lower()
    return env not in ("0", "false", "no", "off") if env else None


def dropout_seed(seed: int, step: int, window_pass: int) -> int:
    """The seed of MLX's random stream for one forward pass (see ``MLXBackend._seeded``)."""
    return int(np.random.SeedSequence([int(seed), int(step), int(window_pass)]).generate_state(1, np.uint64)[0])


def _global_norm(grads: Any) -> mx.array:
    """The global L2 norm of a gradient tree, in float32 (as ``optim.clip_grad_norm`` measures it)."""
    return mx.sqrt(sum((g.astype(mx.float32).square().sum() for _, g in tree_flatten(grads)), mx.array(0.0)))


def _make_adapter(model: nn.Module, recipe: Recipe, layers: list[int], config: dict[str, Any],
                  base: dict[str, str]) -> MLXAdapter:
    """The recipe's adapter method on the frozen base: the one place the backend tells methods apart."""
    if recipe.adapter.method in VIRTUAL_METHODS:  # no LoRA layers: virtual tokens (backends/mlx_virtual.py)
        return VirtualAdapter(model, VirtualSpec.from_config(config, recipe.adapter), base["base_model"])
    return LoraAdapter(model, recipe.adapter, layers, base)


class MLXBackend(AdapterWeights):
    """LoRA, DoRA, QLoRA, prompt and prefix tuning on mlx-lm models; see the module docstring for
    the parity rules."""

    name = "mlx"

    def __init__(self) -> None:
        self._model: nn.Module | None = None
        self._adapter: MLXAdapter | None = None  # chosen once in load()
        self.recipe: Recipe | None = None
        self.model_dir: Path | None = None
        self.quantization = "none"  # what describe() and the run's report say
        self.optimizer: optim.AdamW | None = None
        self.grad_clip = 0.0
        self.last_grad_norm: float | None = None
        self._grads: Any = None
        self._step_fn: Any = None
        self._update_fn: Any = None
        self._window_pass = 0  # forward passes into the current accumulation window (dropout's seed)
        self._window_finite = True  # every loss of the current accumulation window was finite
        self.compile = _compile_default()  # the forward/backward step
        self.compile_update = _compile_update_default()  # the optimizer update
        self.dist = Dist()  # the launcher's world (setup_distributed)

    # ---------------------------------------------------------------- data parallel

    def setup_distributed(self, launch: Launch) -> Dist:
        """Join mlx.launch's group (``mx.distributed.init``: ring or MPI, as the launcher set up);
        gradients are then summed with ``mx.distributed.all_sum`` before clipping (:meth:`_update`)."""
        check_launch(launch, "mlx")
        group = mx.distributed.init(strict=True)
        if launch.size is not None and launch.size != group.size():
            raise MlxtuneError(f"mlx.launch: MLX_WORLD_SIZE is {launch.size} but mx.distributed.init() joined {group.size()} processes")

        def all_sum(values: list[float]) -> list[float]:
            return mx.distributed.all_sum(mx.array(values, dtype=mx.float64), stream=mx.cpu).tolist()

        self.dist = Dist(group.rank(), group.size(), all_sum, launch.launcher)
        return self.dist

    def _sum_gradients(self) -> None:
        """Sum the accumulated gradients (and the window's finiteness) across ranks, in one buffer."""
        flat = tree_flatten(self._grads)
        flag = mx.array([0.0 if self._window_finite else 1.0], dtype=mx.float32)
        buf = mx.distributed.all_sum(mx.concatenate([g.reshape(-1).astype(mx.float32) for _, g in flat] + [flag]))
        out, off = [], 0
        for k, g in flat:
            out.append((k, buf[off:off + g.size].reshape(g.shape).astype(g.dtype)))
            off += g.size
        self._grads = tree_unflatten(out)
        mx.eval(self._grads, buf)
        self._window_finite = float(buf[-1]) == 0.0

    @property
    def model(self) -> nn.Module:
        """The loaded mlx-lm model, adapter in place; RuntimeError before :meth:`load`."""
        if self._model is None:
            raise RuntimeError("MLXBackend: call load() first")
        return self._model

    @property
    def adapter(self) -> MLXAdapter:
        """The recipe's adapter (``backends/mlx_adapters.py``); RuntimeError before :meth:`load`."""
        if self._adapter is None:
            raise RuntimeError("MLXBackend: call load() first")
        return self._adapter

    # ---------------------------------------------------------------- load

    def model_problem(self, model_dir: Path) -> str | None:
        """Why this backend refuses the model (None: it takes it): the check ``load`` runs first
        (``backends/mlx_config.py``), for ``validate`` and ``doctor``."""
        from mlxtune.models.source import read_config

        from .mlx_config import mlx_refusal

        return mlx_refusal(read_config(model_dir), Path(model_dir))

    def load(self, model_dir: Path, recipe: Recipe, layers: list[int]) -> None:
        model_dir = Path(model_dir)
        model, model_type, config, quantization = load_base(model_dir, recipe)
        if recipe.adapter.method not in VIRTUAL_METHODS:  # prompt/prefix wrap no layer: no targets to check
            check_targets(model.model.layers, recipe.adapter.target_modules)
        base = {"base_model": str(model_dir), "model_type": model_type, "quantization": quantization}
        adapter = _make_adapter(model, recipe, list(layers), config, base)
        # "auto" is resolved by the planner before load; the recipe refuses it for prefix tuning
        if recipe.train.grad_checkpointing is True:
            _checkpoint_blocks(model.model.layers)
        mx.eval(model.parameters())
        self._model, self._adapter, self.recipe, self.model_dir = model, adapter, recipe, model_dir
        self.quantization = quantization
        self._grads = None
        self._step_fn = self._update_fn = None
        self.optimizer = None

    # ---------------------------------------------------------------- adapter weights

    def trainable_parameters(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def _adapter_on(self, on: bool) -> AbstractContextManager[None]:
        """The adapted model (``on``) or the base model meanwhile."""
        return nullcontext() if on else self.adapter.disabled()

    # ---------------------------------------------------------------- training

    def setup_optimizer(self, recipe: Recipe) -> None:
        model = self.model
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
        model, opt, hidden = self.model, self.optimizer, self.adapter.hidden
        value_and_grad = nn.value_and_grad(model, _loss)
        grad_clip = self.grad_clip

        chunk = ce_chunk_rows(model.args.vocab_size)

        def step(inputs, rows, targets, weights, inv_denom):
            (_, nll), grads = value_and_grad(model, hidden, inputs, rows, targets, weights, inv_denom, chunk)
            return nll, grads

        def update(grads, norm):
            # the norm _update measured (clip_grad_norm's formula, without measuring it again)
            if grad_clip > 0:
                scale = mx.minimum(grad_clip / (norm + 1e-6), 1.0)
                grads = tree_map(lambda g: (g * scale).astype(g.dtype), grads)
            opt.update(model, grads)

        if self.compile:
            # nn.value_and_grad writes the (traced) trainable arrays into the model, so the model
            # state has to be an output as well as an input.
            state = [model.state, mx.random.state]
            step = mx.compile(step, inputs=state, outputs=state)
        if self.compile or self.compile_update:
            ustate = [model.state, opt.state]
            update = mx.compile(update, inputs=ustate, outputs=ustate)
        self._step_fn, self._update_fn = self._seeded(step), update

    def _seeded(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """``step`` with MLX's global random stream (dropout's masks) seeded before every pass
        from (``train.seed``, optimizer steps done, pass within the accumulation window).

        A resumed run must draw the masks the uninterrupted run drew, and MLX's key cannot be
        set back to a saved value (``mx.random.state`` is read-only; ``mx.random.seed`` takes an
        int), so the stream is made a function of where training stands instead: the step count
        is in the optimizer state that every checkpoint holds, and checkpoints sit at window
        boundaries. A window restarted after an out-of-memory error starts at pass 0 again.
        """
        def seeded(*args: Any) -> Any:
            self._window_pass = 0 if self._grads is None else self._window_pass + 1
            done = int(self.optimizer.state["step"].item()) if self.optimizer is not None else 0
            seed = dropout_seed(self.recipe.train.seed if self.recipe else 0, done, self._window_pass)
            mx.random.seed(seed ^ self.dist.rank)  # each rank its own dropout masks (rank 0: unchanged)
            return step(*args)

        return seeded

    def train_step(self, tokens: np.ndarray, mask: np.ndarray, denom: int, update: bool, lr: float) -> float:
        model = self.model
        if self.optimizer is None or self._step_fn is None:
            raise RuntimeError("MLXBackend: call setup_optimizer() before train_step()")
        if denom <= 0:
            raise ValueError("denom (target tokens in the accumulation window) must be > 0")
        model.train()
        fresh = self._grads is None  # the first pass of an accumulation window
        try:
            nll, grads = self._step_fn(*_targets(tokens, mask), mx.array(1.0 / denom, dtype=mx.float32))
            self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
            mx.eval(nll, self._grads)
        except (RuntimeError, MemoryError) as e:  # an allocation failure the CPU allocator reports
            self._grads = None  # the accumulation window is retried from its start (Metal aborts instead)
            if is_out_of_memory(e) or isinstance(e, MemoryError):
                raise OutOfMemory(f"mlx: {str(e).splitlines()[0] if str(e) else 'allocation failed'}") from None
            raise
        loss = float(np.array(nll).astype(np.float64).sum())  # the rows' NLLs added in float64 (see _loss)
        # a NaN/inf loss in any pass of the window vetoes its update
        self._window_finite = math.isfinite(loss) and (fresh or self._window_finite)
        if update:
            self._update(lr)
        return loss

    def _update(self, lr: float) -> None:
        """Clip and take the AdamW step over the accumulated gradients (compiled on the GPU);
        when the window's loss or the gradient norm is NaN/inf, drop them without a step, so the
        adapter and the optimizer state stay as they were (``last_grad_norm`` reports the bad
        norm). The norm is measured before the step because the compiled update cannot skip."""
        if self.dist.size > 1:
            self._sum_gradients()
        norm = _global_norm(self._grads)
        if self._window_finite and math.isfinite(float(norm)):
            self.optimizer.learning_rate = mx.array(lr, dtype=mx.float32)
            self._update_fn(self._grads, norm)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        self.last_grad_norm = float(norm)
        self._grads = None

    # ---------------------------------------------------------------- eval

    def eval_step(self, tokens: np.ndarray, masks: dict[str, np.ndarray], adapter: bool = True) -> dict[str, float]:
        model = self.model
        model.eval()
        # one pass over the union of the masks; each mask then weights its own rows
        union, selectors = mask_union(masks)
        inputs, rows, targets, _ = _targets(tokens, union)
        weights = {n: s.astype(np.float32) for n, s in selectors.items()}
        with self._adapter_on(adapter):
            ce = _nll_rows(_head(model), _rows(model, self.adapter.hidden, inputs, rows), targets,
                           ce_chunk_rows(model.args.vocab_size))
            n = int(union[:, 1:].sum())
            sums = {k: (ce[:n] * mx.array(w)).sum() for k, w in weights.items()}
            mx.eval(sums)
        return {k: float(v) for k, v in sums.items()}

    # ---------------------------------------------------------------- adapters on disk

    def save_adapter(self, path: Path) -> None:
        """mlx-lm's format for LoRA/DoRA; PEFT's for prompt/prefix (mlx-lm has none for them)."""
        self.adapter.save(Path(path))

    def load_adapter(self, path: Path) -> None:
        """Load an adapter folder written by either backend (mlx-lm's format or PEFT's), so an
        adapter trained on one backend runs on the other."""
        self.adapter.load(Path(path))

    # ---------------------------------------------------------------- optimizer state

    def save_optimizer(self, path: Path) -> None:
        if self.optimizer is None:
            raise RuntimeError("MLXBackend: no optimizer to save")
        flat = dict(tree_flatten(self.optimizer.state))
        step = int(self.optimizer.state["step"].item())
        with atomic_file(Path(path)) as tmp, open(tmp, "wb") as f:  # a file object: mlx adds no suffix
            mx.save_safetensors(f, flat, metadata={"step": str(step), "format": "mlxtune-mlx-adamw"})

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

    def _last_logits(self, inputs: mx.array, cache: list[Any]) -> np.ndarray:
        """float32 logits of the last position only: the vocabulary projection of the whole
        prompt would cost B * T * V floats for nothing."""
        model = self.model
        h = model.model(inputs, cache=cache)[:, -1, :]
        return np.array(_head(model)(h).astype(mx.float32))

    def generate(self, prompts: list[np.ndarray], max_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0, adapter: bool = True,
                 should_stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Batched generation with mlx-lm's ``BatchKVCache`` (see ``Backend.generate``).

        The cache takes the left padding per row: its mask hides the pads and its per-row rope
        offset starts every row's real tokens at position 0, so padding does not change a row
        (the adapter's ``generation_cache`` puts a prefix ahead of every row).
        Finished rows are filtered out of the cache. Eval mode (no dropout) while generating.
        """
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        from mlxtune.evaluation.generation import check_sampling, decode_loop, left_pad

        model = self.model
        check_sampling(temperature, top_p)
        if not prompts or max_tokens < 1:
            return [[] for _ in prompts]
        kinds = {type(c).__name__ for c in make_prompt_cache(model)}
        if kinds != {KVCache.__name__}:  # sliding-window or other caches: not checked here
            raise MlxtuneError(f"mlx backend: generation supports plain KV caches only, this model uses {sorted(kinds)} "
                               "(sliding-window layers); generate with --backend torch, or train on MLX without "
                               "eval.metrics and eval.show_examples")
        ids, padding = left_pad(prompts, pad_id)
        was_training = model.training
        model.eval()
        try:
            with self._adapter_on(adapter):
                cache = self.adapter.generation_cache(model, padding)

                def step(tokens: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
                    if keep is not None:
                        rows = mx.array(keep.astype(np.int32))
                        for c in cache:
                            c.filter(rows)
                    return self._last_logits(mx.array(tokens.astype(np.int32))[:, None], cache)

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
