"""Backends: one module per framework, behind the small ``Backend`` protocol.

A backend imports the core (``mlxtune``), never another backend. The core imports a backend
only through :func:`load_backend`, lazily, so ``mlxtune --help`` needs no framework.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mlxtune.errors import MlxtuneError
from mlxtune.training.backend_choice import resolve_backend

if TYPE_CHECKING:
    from mlxtune.recipe.schema import Recipe

# name -> (module, class, pip extra); the names are mlxtune.training.backend_choice.BACKEND_NAMES
BACKENDS = {
    "torch": ("backends.torch_peft", "TorchBackend", "torch"),
    "mlx": ("backends.apple_mlx", "MLXBackend", "mlx"),
}


class Backend(Protocol):
    """What the core's loop needs from a framework.

    Arrays cross the boundary as numpy: ``tokens`` int32[B, T] right-padded, masks bool[B, T]
    where ``mask[b, t]`` means "token t is a target, predicted from tokens[:t]". The shift for
    next-token prediction happens inside the backend's loss, nowhere else. Losses come back as
    sums over target tokens so the core can weight by tokens across batches.

    Adapter weights cross as a dict keyed ``"<module path>.lora_A"`` (rank, in) and
    ``"<module path>.lora_B"`` (out, rank), the module path as in the Hugging Face model
    (``model.layers.0.self_attn.q_proj``); DoRA adds ``"<module path>.lora_magnitude"`` (out,),
    which ``set_adapter_weights`` initialises from the base weights when the dict leaves it out.

    Prompt and prefix tuning (``adapter.method = "prompt" | "prefix"``): the weights cross in PEFT's
    prompt-encoder names and layout (``embedding.weight``, and ``transform.0/2.weight/bias`` for
    the projection MLP; ``mlxtune/adapters/virtual.py``), ``adapter_shapes`` returns name -> shape, the
    token arrays and masks still describe the real tokens only (the virtual tokens are in front
    of every row and never carry loss), and adapters are saved in PEFT's format on both backends.
    """

    name: str
    last_grad_norm: float | None  # global gradient norm (before clipping) of the last update

    def load(self, model_dir: Path, recipe: Recipe, layers: list[int]) -> None:
        """Load the base model and tokenizer-independent weights, and add the recipe's adapter
        to ``recipe.adapter.target_modules`` in the blocks ``layers``."""

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Module path -> (in_features, out_features) of every adapted linear layer; for prompt
        and prefix tuning, weight name -> shape (``mlxtune.adapters.virtual.VirtualSpec.shapes``)."""

    def set_adapter_weights(self, weights: dict[str, np.ndarray]) -> None: ...

    def get_adapter_weights(self) -> dict[str, np.ndarray]: ...

    def trainable_parameters(self) -> int: ...

    def setup_optimizer(self, recipe: Recipe) -> None:
        """AdamW with bias correction and decoupled weight decay over the adapter only."""

    def train_step(self, tokens: np.ndarray, mask: np.ndarray, denom: int, update: bool, lr: float) -> float:
        """Forward + backward of sum(NLL over mask) / denom, accumulating gradients.

        With ``update``: clip the global grad norm (recipe's grad_clip), take one AdamW step at
        learning rate ``lr``, zero the gradients. Returns the NLL sum (not divided).

        Never apply a non-finite update: when the NLL of any pass since the last update or the
        global grad norm is NaN or infinite, discard the accumulated gradients without an
        optimizer step (the adapter and the optimizer state stay bit-identical), still return
        the NLL sum, and set ``last_grad_norm`` to the norm measured (which may be NaN/inf); the
        loop then stops or skips the step (``train.on_nonfinite``). Finite steps are unchanged.

        On an allocation failure: discard the gradients accumulated since the last update and
        raise ``mlxtune.errors.OutOfMemory``; the loop retries the step in smaller passes. The
        loss is computed from the final hidden states of the masked positions only, with the
        vocabulary projection in chunks (never B x T x V logits)."""

    def eval_step(self, tokens: np.ndarray, masks: dict[str, np.ndarray], adapter: bool = True) -> dict[str, float]:
        """One forward pass without gradients; NLL sum under each mask. ``adapter=False`` scores
        the base model."""

    def save_adapter(self, path: Path) -> None:
        """Write the adapter in the framework's own format into the (new, empty) folder ``path``."""

    def load_adapter(self, path: Path) -> None: ...

    def save_optimizer(self, path: Path) -> None:
        """Write the optimizer state as the single file ``path`` (safetensors or a tensor-only file)."""

    def load_optimizer(self, path: Path) -> None: ...

    def generate(self, prompts: list[np.ndarray], max_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0, adapter: bool = True,
                 should_stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Continue every prompt (int32 token ids, no padding) in ONE batch. Returns the new token
        ids per prompt, without the prompt and without the final eos. A row stops at an eos id,
        when ``should_stop(row_ids_so_far)`` is True (the ids that made it True are kept), or at
        ``max_tokens``; the batch stops when all rows stopped. ``temperature`` 0 = greedy;
        otherwise softmax(logits / temperature) with nucleus ``top_p``, seeded by ``seed`` so the
        same call gives the same output. ``adapter=False`` generates with the base model.

        Backends left-pad the batch (``pad_id``; padding never changes a row's result), keep a
        KV cache, and leave sampling and stopping to :func:`mlxtune.evaluation.generation.decode_loop`."""

    def peak_memory(self) -> int:
        """Peak memory in bytes since load (see the backend's docstring for what is measured)."""

    def describe(self) -> dict[str, str]:
        """Device, dtype, framework versions and the base's quantization, for the run's report."""


class AdapterWeights:
    """The three weight methods of :class:`Backend`, handed to the backend's adapter object
    (``self.adapter``: one per method, with ``shapes``/``set_weights``/``get_weights``), so each
    backend writes them once for all its methods."""

    adapter: Any

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.adapter.shapes()

    def set_adapter_weights(self, weights: dict[str, np.ndarray]) -> None:
        self.adapter.set_weights(weights)

    def get_adapter_weights(self) -> dict[str, np.ndarray]:
        return self.adapter.get_weights()


def load_backend(name: str) -> Backend:
    """Instantiate a backend by name ('auto' picks by platform: resolve_backend)."""
    name, _ = resolve_backend(name)
    if name not in BACKENDS:
        raise MlxtuneError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    module_name, cls_name, extra = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("backends"):
            raise MlxtuneError(f"the {name} backend is not available in this version of mlxtune") from None
        raise MlxtuneError(
            f"the {name} backend needs '{e.name}', which is not installed: "
            f"pip install 'mlxtune[{extra}]'" + (" (install torch==2.13.0 or your CUDA build of torch first)" if name == "torch" else "")
        ) from None
    return getattr(module, cls_name)()
