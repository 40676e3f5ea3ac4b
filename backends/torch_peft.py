"""torch + transformers + peft backend (CUDA, MPS or CPU).

Adapters: one object per method behind one interface (``backends/torch_adapter.py``), chosen
once in :meth:`TorchBackend.load`: peft's LoRA and DoRA (``backends/torch_lora.py``), PEFT's
prompt and prefix tuning (``backends/torch_virtual.py``). A quantized base (``qlora``, or
``model.quantize_bits`` > 0) is loaded with bitsandbytes on CUDA only (4 bits: NF4, double
quantization, bfloat16 compute; 8 bits: LLM.int8) and prepared with peft's
``prepare_model_for_kbit_training`` (``backends/torch_model.py``); elsewhere the load stops with
:func:`mlxtune.models.quantization.torch_problem`'s message.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only); elsewhere the
process's peak resident set size (``getrusage``), which includes Python and the libraries.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlxtune.data.batching import mask_union
from mlxtune.errors import OutOfMemory, is_out_of_memory
from mlxtune.models.quantization import torch_label
from mlxtune.planning.memory import ce_chunk_rows
from mlxtune.recipe.schema import VIRTUAL_METHODS, Recipe
from mlxtune.training.dist import Dist, Launch, check_launch

from . import AdapterWeights
from .torch_adapter import TorchAdapter
from .torch_fsdp import base_bytes, gathered, shard_base
from .torch_lora import LoraTorch
from .torch_model import DTYPES, attach_peft, check_device, check_model, load_base, pick_device
from .torch_virtual import VirtualTorch

ADAMW_KWARGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def nll_sum(logits: torch.Tensor, tokens: torch.Tensor, masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum of next-token NLL under each mask from full logits: the fallback for models whose
    head is not a plain linear layer (see :data:`CHUNKED_HEAD_TYPES`). Only the masked positions
    are pushed through log-softmax, in float32."""
    logits = logits[:, :-1]
    targets = tokens[:, 1:]
    out = []
    for mask in masks:
        sel = mask[:, 1:]
        out.append(F.cross_entropy(logits[sel].float(), targets[sel].long(), reduction="sum"))
    return out


# model types whose causal-LM head is exactly ``lm_head(final hidden states)`` (no logit scaling or
# soft-capping), so the loss may run the body and the head separately.
CHUNKED_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3", "starcoder2", "mixtral", "qwen3_moe")


def shifted_rows(hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states that predict a target, their target ids): the one place the shift happens
    on torch. ``mask[b, t]`` marks token t as a target, predicted from position t - 1."""
    sel = mask[:, 1:]
    return hidden[:, :-1][sel], tokens[:, 1:][sel]


class ChunkedNLL(torch.autograd.Function):
    """Sum of cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, ``rows`` rows
    at a time, logits in float32.

    The head is frozen, so the gradient with respect to ``hidden`` is computed in the forward
    pass, chunk by chunk, and backward only scales it: at no time do more than one chunk of
    float32 logits exist, and the logits of positions without a target are never computed.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                targets: torch.Tensor, rows: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for s in range(0, hidden.shape[0], rows):
            # in place, so one chunk of float32 logits is the only vocabulary-sized tensor
            logits = F.linear(hidden[s:s + rows], weight, bias).float()
            t = targets[s:s + rows][:, None]
            picked = logits.gather(1, t)
            top = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(top).exp_()
            norm = p.sum(dim=-1, keepdim=True)
            total += (top + norm.log() - picked).sum()
            if grad is not None:
                p.div_(norm).scatter_add_(1, t, torch.full_like(picked, -1.0))  # softmax - one-hot
                grad[s:s + rows] = p.to(weight.dtype) @ weight
            del logits, p
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None


@torch.no_grad()
def chunked_nll_rows(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-row NLL (float32) of ``head(hidden)`` against ``targets``, ``rows`` rows at a time."""
    out = [F.cross_entropy(head(hidden[s:s + rows]).float(), targets[s:s + rows], reduction="none")
           for s in range(0, hidden.shape[0], rows)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def bf16_frozen_linears(model: torch.nn.Module, head: torch.nn.Module | None) -> None:
    """``train.autocast = "bfloat16"``: the frozen linear weights of the blocks stored in bf16.
    Autocast recasts a frozen float32 weight on every use (its cache keeps trainable leaves
    only); stored in bf16 the matmul runs as it would anyway, without the copy. Embeddings,
    norms and the head (often the tied embedding) keep float32, so the residual stream and
    the logits stay float32; adapter parameters (trainable) are not touched."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not head and not any(p.requires_grad for p in m.parameters()):
            m.to(torch.bfloat16)


def adamw_impl(choice: str, device: torch.device) -> str:
    """``train.adamw_impl`` resolved: ``auto`` is fused on CUDA, foreach elsewhere.

    On a CPU torch's own default is the one-tensor-at-a-time loop; foreach gives bit-identical
    results (so the parity tests are unaffected) and, for the 420 small tensors of a rank-16 LoRA
    on SmolLM2 on 2 cores, 20 ms per update on an idle machine (loop 19 ms, fused 6 ms but not
    bit-identical) and 44 ms on a busy one, where the loop's many small parallel ops took 350 ms."""
    if choice == "auto":
        return "fused" if device.type == "cuda" else "foreach"
    return choice


class TorchBackend(AdapterWeights):
    name = "torch"

    def __init__(self) -> None:
        self.model = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.recipe: Recipe | None = None
        self.last_grad_norm: float | None = None
        self._window_finite = True  # every loss since the last update was finite
        self.quantization = "none"
        self.adapter: TorchAdapter | None = None  # the recipe's adapter (backends/torch_adapter.py)
        self.dist = Dist()  # the launcher's world (setup_distributed)
        self._root = None  # train.shard_base: the FSDP2 root the model runs through (backends/torch_fsdp.py)

    # -- data parallel (mlxtune/training/dist.py) -----------------------------------------
    def setup_distributed(self, launch: Launch) -> Dist:
        """Join torchrun's / accelerate's process group from the environment they set: NCCL on
        CUDA (one GPU per local rank), gloo elsewhere. Gradients are summed with an explicit
        all_reduce before clipping (:meth:`_update`), not DDP: the loop already divides by the
        global token count, so the sum is the one-process gradient."""
        import torch.distributed as tdist

        check_launch(launch, "torch")
        cuda = torch.cuda.is_available()
        if cuda:  # model.device "cuda"/"auto" then means this rank's GPU
            torch.cuda.set_device(launch.local_rank)
        if not tdist.is_initialized():
            # tensors pick their group by device: a CPU run on a CUDA machine still works
            tdist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        rank, size = tdist.get_rank(), tdist.get_world_size()

        def all_sum(values: list[float]) -> list[float]:
            t = torch.tensor(values, dtype=torch.float64)
            tdist.all_reduce(t)
            return t.tolist()

        self.dist = Dist(rank, size, all_sum, launch.launcher)
        return self.dist

    def _sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the accumulated gradients (and the window's finiteness) across ranks, in one buffer."""
        import torch.distributed as tdist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flag = torch.tensor([0.0 if self._window_finite else 1.0], device=grads[0].device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [flag])
        tdist.all_reduce(flat)
        off = 0
        for p, g in zip(params, grads):
            p.grad = flat[off:off + g.numel()].view_as(g).to(g.dtype)
            off += g.numel()
        self._window_finite = bool(flat[-1] == 0)

    # -- loading --------------------------------------------------------------------
    def load(self, model_dir: Path, recipe: Recipe, layers: list[int]) -> None:
        import peft  # noqa: F401  (a missing library fails before anything else)
        import transformers  # noqa: F401

        self.recipe = recipe
        self.device = pick_device(recipe.model.device)
        self.dtype = DTYPES[recipe.model.dtype]
        check_device(recipe, self.device)
        torch.manual_seed(recipe.train.seed + self.dist.rank)  # each rank its own dropout masks
        bits = check_model(model_dir, recipe, self.device)
        base = load_base(model_dir, recipe, self.dtype, self.device, bits)
        kind: type[TorchAdapter] = VirtualTorch if recipe.adapter.method in VIRTUAL_METHODS else LoraTorch
        config = kind.peft_config(base, recipe.adapter, layers)
        # "auto" is resolved by the planner before load
        self.model = attach_peft(base, config, recipe.train.grad_checkpointing is True)
        shard = recipe.train.shard_base and self.dist.size > 1  # its limits: Recipe.check_shard_base
        if not bits and not shard:  # a bitsandbytes model is placed by its device_map, a sharded one by FSDP2
            self.model = self.model.to(self.device)
        self.quantization = torch_label(bits)
        # the loss runs body and head apart (chunked cross-entropy) where the head is a plain linear
        chunked = base.config.model_type in CHUNKED_HEAD_TYPES and isinstance(base.get_output_embeddings(), torch.nn.Linear)
        self._head = base.get_output_embeddings() if chunked else None
        self._ce_rows = ce_chunk_rows(base.config.vocab_size)
        self.adapter = kind.attach(self.model, recipe.adapter, chunked, self.device)
        if recipe.train.autocast == "bfloat16" and self.dtype == torch.float32 and not bits and not shard:
            bf16_frozen_linears(self.model, base.get_output_embeddings())
        if shard:  # only this rank's shards reach the device; then the adapter, whole
            self._root = shard_base(self.model, self.device, self.dist.size)
            self.model.to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # -- training -------------------------------------------------------------------
    def setup_optimizer(self, recipe: Recipe) -> None:
        t = recipe.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                                           **ADAMW_KWARGS[adamw_impl(t.adamw_impl, self.device)])
        self.optimizer.zero_grad(set_to_none=True)

    def _autocast(self):
        """``train.autocast``: the forward pass (and so its backward) with bf16 matmuls."""
        if self.recipe.train.autocast == "off":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def _hidden(self, tok: torch.Tensor) -> torch.Tensor:
        """Final hidden states of the real tokens (behind the virtual tokens for prompt/prefix)."""
        return self.adapter.hidden(tok)

    def train_step(self, tokens: np.ndarray, mask: np.ndarray, denom: int, update: bool, lr: float) -> float:
        """See ``Backend.train_step``. An out-of-memory error discards the gradients accumulated
        since the last update and raises :class:`mlxtune.errors.OutOfMemory`, so the loop can
        retry the whole step with smaller micro batches. A non-finite loss in the window or
        gradient norm discards them too, without an optimizer step (:meth:`_update`)."""
        self.model.train()
        tok = self._tensor(tokens).long()
        try:
            with self._autocast():
                loss_sum = self._through_root(self._loss_sum, tok, mask)
            (loss_sum / denom).backward()
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is a RuntimeError too
            if not is_out_of_memory(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            self._window_finite = True
            raise OutOfMemory(f"torch: {str(e).splitlines()[0]}") from None
        loss = float(loss_sum.detach())
        self._window_finite = self._window_finite and math.isfinite(loss)
        if update:
            self._update(lr)
        return loss

    def _through_root(self, fn: Callable, *args):
        """``fn(*args)``; with ``train.shard_base`` inside the FSDP2 root's forward (the base's
        non-block weights gathered meanwhile)."""
        return fn(*args) if self._root is None else self._root(fn, *args)

    def _loss_sum(self, tok: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
        if self._head is None:
            return nll_sum(self.model(input_ids=tok).logits, tok, [self._tensor(mask)])[0]
        h, t = shifted_rows(self._hidden(tok), tok, self._tensor(mask))
        return ChunkedNLL.apply(h, self._head.weight, self._head.bias, t, self._ce_rows)

    def _update(self, lr: float) -> None:
        """Clip and take the AdamW step over the accumulated gradients, then zero them; when the
        window's loss or the gradient norm is NaN/inf, zero them without a step, so the adapter
        and the optimizer state stay as they were (``last_grad_norm`` reports the bad norm)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.dist.size > 1:
            self._sum_gradients(params)
        # the norm before clipping; max_norm=inf only measures it
        clip = self.recipe.train.grad_clip if self.recipe.train.grad_clip > 0 else float("inf")
        self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        if self._window_finite and math.isfinite(self.last_grad_norm):
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._window_finite = True

    @torch.no_grad()
    def eval_step(self, tokens: np.ndarray, masks: dict[str, np.ndarray], adapter: bool = True) -> dict[str, float]:
        self.model.eval()
        tok = self._tensor(tokens).long()
        with nullcontext() if adapter else self.adapter.disabled(), self._autocast():
            return self._through_root(self._eval_sums, tok, masks)

    def _eval_sums(self, tok: torch.Tensor, masks: dict[str, np.ndarray]) -> dict[str, float]:
        names = list(masks)
        if self._head is None:
            sums = nll_sum(self.model(input_ids=tok).logits, tok, [self._tensor(masks[n]) for n in names])
            return {n: float(s) for n, s in zip(names, sums)}
        # one pass over the union of the masks; each mask then sums its own positions
        union, picks = mask_union(masks)
        h, t = shifted_rows(self._hidden(tok), tok, self._tensor(union))
        nll = chunked_nll_rows(h, self._head, t, self._ce_rows)
        return {n: float(nll[self._tensor(picks[n])].sum()) for n in names}

    # -- files ----------------------------------------------------------------------
    def save_adapter(self, path: Path) -> None:
        """PEFT format: adapter_model.safetensors + adapter_config.json (prompt/prefix: and the MLP, if any)."""
        self.adapter.save(path)

    def load_adapter(self, path: Path) -> None:
        """Load an adapter folder in PEFT's format (as :meth:`save_adapter` writes it); LoRA and DoRA
        also in mlx-lm's (``adapters.safetensors``, as the MLX backend or ``mlx_lm.lora`` writes it)."""
        with self._dora_gathered():
            self.adapter.load(path)

    def set_adapter_weights(self, weights: dict[str, np.ndarray]) -> None:
        with self._dora_gathered():
            self.adapter.set_weights(weights)

    def _dora_gathered(self):
        """DoRA without magnitudes reads the base weights: with ``train.shard_base`` they are whole meanwhile."""
        return gathered(self._root if self.recipe.adapter.method == "dora" else None)

    def save_optimizer(self, path: Path) -> None:
        """AdamW state as safetensors: tensors under ``<param index>.<name>``, step counts included,
        plus the torch RNG state so dropout continues as if never interrupted."""
        from safetensors.torch import save_file

        flat = {"rng.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            flat["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        for idx, st in self.optimizer.state_dict()["state"].items():
            for k, v in st.items():
                flat[f"{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
        save_file(flat, str(path))

    def load_optimizer(self, path: Path) -> None:
        from safetensors.torch import load_file

        flat = load_file(str(path))
        torch.set_rng_state(flat.pop("rng.cpu"))
        if "rng.cuda" in flat:
            cuda_rng = flat.pop("rng.cuda")
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng, self.device)
        sd = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in flat.items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = v
        sd["state"] = state
        self.optimizer.load_state_dict(sd)

    # -- generation -----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[np.ndarray], max_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0, adapter: bool = True,
                 should_stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
        """Batched generation with a KV cache (see ``Backend.generate``; the prefill is the
        adapter's, e.g. behind the virtual tokens).

        Left padding is invisible to a row: the attention mask hides the pads and position ids
        count only real tokens, as in transformers' own ``generate``. The training config keeps
        ``use_cache = False``; it is passed as True per call instead. Eval mode (no dropout)
        while generating, the previous mode restored after.
        """
        from mlxtune.evaluation.generation import check_sampling, decode_loop, left_pad

        check_sampling(temperature, top_p)
        if not prompts or max_tokens < 1:
            return [[] for _ in prompts]
        ids, padding = left_pad(prompts, pad_id)

        def decode(first: np.ndarray, step: Callable) -> list[list[int]]:
            return decode_loop(first, step, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                               eos_ids=eos_ids, should_stop=should_stop)

        was_training = self.model.training
        self.model.eval()
        try:
            # under autocast as in training and eval (the blocks' frozen weights may be bf16)
            with nullcontext() if adapter else self.adapter.disabled(), self._autocast():
                return self._through_root(self.adapter.generate, ids, padding, decode)
        finally:
            self.model.train(was_training)

    # -- reporting ------------------------------------------------------------------
    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def describe(self) -> dict[str, str]:
        import peft
        import transformers

        device = str(self.device)
        if self.device.type == "cuda":
            device += f" ({torch.cuda.get_device_name(self.device)})"
        return {
            "backend": "torch", "device": device, "dtype": self.recipe.model.dtype,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "threads": str(torch.get_num_threads()), "autocast": self.recipe.train.autocast,
            "adamw": adamw_impl(self.recipe.train.adamw_impl, self.device),
            "quantization": self.quantization,
        } | ({} if self._root is None else {"shard_base": "fsdp2, {} of {} base parameter bytes on this rank".format(*base_bytes(self.model))})
