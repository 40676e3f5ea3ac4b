"""torch + transformers + peft backend (CUDA, MPS or CPU).

Adapters: peft's LoRA; DoRA is peft's ``use_dora`` (its magnitude crosses the backend boundary as
``<module>.lora_magnitude``); a quantized base (``qlora``, or ``model.quantize_bits`` > 0) is
loaded with bitsandbytes on CUDA only (4 bits: NF4, double quantization, bfloat16 compute; 8
bits: LLM.int8) and prepared with peft's ``prepare_model_for_kbit_training``; elsewhere the
load stops with :func:`mlxtune.models.quantization.torch_problem`'s message.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only); elsewhere the
process's peak resident set size (``getrusage``), which includes Python and the libraries.
"""

from __future__ import annotations

import json
import resource
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlxtune.adapters.lora import MAGNITUDE, check_adapter, check_weight_keys, read_adapter
from mlxtune.errors import MlxtuneError
from mlxtune.errors import OutOfMemory, is_out_of_memory
from mlxtune.planning.memory import ce_chunk_rows
from mlxtune.models.quantization import base_bits, torch_label, torch_problem
from mlxtune.recipe.schema import VIRTUAL_METHODS, Recipe
from mlxtune.adapters.virtual import VirtualSpec

from .torch_virtual import VirtualTorch, generate_virtual
from .torch_virtual import check_supported as check_virtual
from .torch_virtual import peft_config as virtual_peft_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_PREFIX = "base_model.model."
ADAMW_KWARGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MlxtuneError('model.device = "cuda" but torch sees no CUDA device; use "auto" or "cpu"')
    if name == "mps" and not torch.backends.mps.is_available():
        raise MlxtuneError('model.device = "mps" but MPS is not available; use "auto" or "cpu"')
    return torch.device(name)


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
CHUNKED_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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


def adamw_impl(choice: str, device: torch.device) -> str:
    """``train.adamw_impl`` resolved: ``auto`` is fused on CUDA, foreach elsewhere.

    On a CPU torch's own default is the one-tensor-at-a-time loop; foreach gives bit-identical
    results (so the parity tests are unaffected) and, for the 420 small tensors of a rank-16 LoRA
    on SmolLM2 on 2 cores, 20 ms per update on an idle machine (loop 19 ms, fused 6 ms but not
    bit-identical) and 44 ms on a busy one, where the loop's many small parallel ops took 350 ms."""
    if choice == "auto":
        return "fused" if device.type == "cuda" else "foreach"
    return choice


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        self.model = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.recipe: Recipe | None = None
        self.last_grad_norm: float | None = None
        self.dora = False
        self.quantization = "none"
        self.virtual: VirtualTorch | None = None  # prompt/prefix tuning (backends/torch_virtual.py)

    # -- loading --------------------------------------------------------------------
    def load(self, model_dir: Path, recipe: Recipe, layers: list[int]) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.recipe = recipe
        self.device = pick_device(recipe.model.device)
        self.dtype = DTYPES[recipe.model.dtype]
        if recipe.train.autocast != "off" and (self.device.type == "mps" or (self.device.type == "cuda" and not torch.cuda.is_bf16_supported())):
            raise MlxtuneError(f'train.autocast = "{recipe.train.autocast}": this {self.device.type} device has no bfloat16 autocast; set train.autocast = "off"')
        torch.manual_seed(recipe.train.seed)
        if "quantization" in json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")):
            raise MlxtuneError(f"{model_dir}: an MLX-quantized model folder (mlx-lm's packed weights), which torch cannot load; "
                               "use --backend mlx, or the unquantized model with model.quantize_bits")
        bits = base_bits(recipe)
        problem = torch_problem(recipe, self.device.type)
        if problem:
            raise MlxtuneError(problem)
        quant: dict = {}
        if bits:
            from transformers import BitsAndBytesConfig

            qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16) if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
            quant = {"quantization_config": qc, "device_map": {"": self.device.index or 0}}
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype, attn_implementation="sdpa",
            trust_remote_code=recipe.model.trust_remote_code, **quant,
        )
        if bits:
            from peft import prepare_model_for_kbit_training

            # freezes the base and makes the unquantized rest float32; checkpointing is set below
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        base.config.use_cache = False
        n_layers = base.config.num_hidden_layers
        a = recipe.adapter
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})  # bnb's layers subclass Linear
        missing = [t for t in a.target_modules if t not in linear_names]
        if missing:
            raise MlxtuneError(f"adapter.target_modules: {missing} not found in {model_dir.name}; its linear layers are: {', '.join(linear_names)}")
        config = LoraConfig(
            r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
            layers_to_transform=None if len(layers) == n_layers else layers, bias="none", task_type="CAUSAL_LM",
            use_dora=a.method == "dora",
        ) if a.method not in VIRTUAL_METHODS else virtual_peft_config(VirtualSpec.from_config(base.config.to_dict(), a))
        if recipe.train.grad_checkpointing is True:  # "auto" is resolved by the planner before load
            if hasattr(base, "activation_checkpointing_enable"):  # the newer transformers 5 name
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = get_peft_model(base, config)
        if not bits:  # a bitsandbytes model is placed by its device_map
            self.model = self.model.to(self.device)
        self.dora, self.quantization = a.method == "dora", torch_label(bits)
        # the loss runs body and head apart (chunked cross-entropy) where the head is a plain linear
        chunked = base.config.model_type in CHUNKED_HEAD_TYPES and isinstance(base.get_output_embeddings(), torch.nn.Linear)
        self._body = base.base_model if chunked else None
        self._head = base.get_output_embeddings() if chunked else None
        self._ce_rows = ce_chunk_rows(base.config.vocab_size)
        self.virtual = None
        if a.method in VIRTUAL_METHODS:
            spec = VirtualSpec.from_config(base.config.to_dict(), a)
            check_virtual(base, spec, chunked, recipe.train.grad_checkpointing is True)
            self.virtual = VirtualTorch(self.model, spec)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        from peft.tuners.lora import LoraLayer

        return {name.removeprefix(PEFT_PREFIX): m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """LoRA: module path -> (in, out); prompt/prefix: weight name -> shape (mlxtune/adapters/virtual.py)."""
        if self.virtual is not None:
            return self.virtual.spec.shapes()
        return {n: (m.in_features, m.out_features) for n, m in self._lora_modules().items()}

    def set_adapter_weights(self, weights: dict[str, np.ndarray]) -> None:
        """LoRA A/B (and DoRA magnitudes); DoRA without magnitudes initialises them as peft does."""
        from peft.utils.integrations import dequantize_module_weight

        if self.virtual is not None:
            return self.virtual.set_weights(weights)
        modules = self._lora_modules()
        has_mag = check_weight_keys(weights, modules, self.dora)
        with torch.no_grad():
            for name, m in modules.items():
                m.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(weights[f"{name}.lora_A"], dtype=np.float32)))
                m.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(weights[f"{name}.lora_B"], dtype=np.float32)))
                if not self.dora:
                    continue
                mag = m.lora_magnitude_vector["default"].weight
                if has_mag:
                    mag.copy_(torch.from_numpy(np.asarray(weights[f"{name}.{MAGNITUDE}"], dtype=np.float32)))
                else:  # row norms of W + scale * B @ A (peft's DoraLinearLayer.update_layer, in place)
                    w = dequantize_module_weight(m.get_base_layer()).float()
                    delta = m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float()
                    mag.copy_(torch.linalg.norm(w + m.scaling["default"] * delta, dim=1))

    def get_adapter_weights(self) -> dict[str, np.ndarray]:
        if self.virtual is not None:
            return self.virtual.get_weights()
        out = {}  # copies: on CPU in fp32, .numpy() would share memory with the live parameters
        for name, m in self._lora_modules().items():
            out[f"{name}.lora_A"] = m.lora_A["default"].weight.detach().float().cpu().numpy().copy()
            out[f"{name}.lora_B"] = m.lora_B["default"].weight.detach().float().cpu().numpy().copy()
            if self.dora:
                out[f"{name}.{MAGNITUDE}"] = m.lora_magnitude_vector["default"].weight.detach().float().cpu().numpy().copy()
        return out

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
        if self.virtual is not None:  # the real tokens' states behind the virtual tokens
            return self.virtual.hidden(tok)
        return self._body(input_ids=tok).last_hidden_state

    def _adapter_off(self):
        return self.virtual.disabled() if self.virtual is not None else self.model.disable_adapter()

    def train_step(self, tokens: np.ndarray, mask: np.ndarray, denom: int, update: bool, lr: float) -> float:
        """See ``Backend.train_step``. An out-of-memory error discards the gradients accumulated
        since the last update and raises :class:`mlxtune.planning.memory.OutOfMemory`, so the loop can
        retry the whole step with smaller micro batches."""
        self.model.train()
        tok = self._tensor(tokens).long()
        try:
            with self._autocast():
                if self._head is None:
                    (loss_sum,) = nll_sum(self.model(input_ids=tok).logits, tok, [self._tensor(mask)])
                else:
                    h, t = shifted_rows(self._hidden(tok), tok, self._tensor(mask))
                    loss_sum = ChunkedNLL.apply(h, self._head.weight, self._head.bias, t, self._ce_rows)
            (loss_sum / denom).backward()
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is a RuntimeError too
            if not is_out_of_memory(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise OutOfMemory(f"torch: {str(e).splitlines()[0]}") from None
        if update:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            # the norm before clipping; max_norm=inf only measures it
            clip = self.recipe.train.grad_clip if self.recipe.train.grad_clip > 0 else float("inf")
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum.detach())

    @torch.no_grad()
    def eval_step(self, tokens: np.ndarray, masks: dict[str, np.ndarray], adapter: bool = True) -> dict[str, float]:
        self.model.eval()
        tok = self._tensor(tokens).long()
        names = list(masks)
        with nullcontext() if adapter else self._adapter_off(), self._autocast():
            if self._head is None:
                sums = nll_sum(self.model(input_ids=tok).logits, tok, [self._tensor(masks[n]) for n in names])
                return {n: float(s) for n, s in zip(names, sums)}
            # one pass over the union of the masks; each mask then sums its own positions
            union = np.logical_or.reduce([np.asarray(masks[n], dtype=bool) for n in names])
            h, t = shifted_rows(self._hidden(tok), tok, self._tensor(union))
            nll = chunked_nll_rows(h, self._head, t, self._ce_rows)
        picked = union[:, 1:]
        return {n: float(nll[self._tensor(np.asarray(masks[n], dtype=bool)[:, 1:][picked])].sum()) for n in names}

    # -- files ----------------------------------------------------------------------
    def save_adapter(self, path: Path) -> None:
        """PEFT format: adapter_model.safetensors + adapter_config.json."""
        if self.virtual is not None:
            return self.virtual.save(path)
        self.model.save_pretrained(str(path), safe_serialization=True)

    def load_adapter(self, path: Path) -> None:
        """Load an adapter folder in PEFT's format (as :meth:`save_adapter` writes it) or in mlx-lm's
        (``adapters.safetensors``, as the MLX backend or ``mlx_lm.lora`` writes it), LoRA or DoRA."""
        from safetensors.torch import load_file

        if self.virtual is not None:  # prompt/prefix: PEFT's format from either backend
            return self.virtual.load(path)

        a = self.recipe.adapter
        af = read_adapter(Path(path), lambda f: {k: v.float().numpy() for k, v in load_file(str(f)).items()})
        check_adapter(af, Path(path), a.method, a.rank, a.scale, self._lora_modules())
        self.set_adapter_weights(af.weights)

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
        """Batched generation with a KV cache (see ``Backend.generate``).

        Left padding is invisible to a row: the attention mask hides the pads and position ids
        count only real tokens, as in transformers' own ``generate``. The training config keeps
        ``use_cache = False``; it is passed as True per call instead. Eval mode (no dropout)
        while generating, the previous mode restored after.
        """
        from transformers import DynamicCache

        from mlxtune.evaluation.generation import check_sampling, decode_loop, left_pad

        check_sampling(temperature, top_p)
        if not prompts or max_tokens < 1:
            return [[] for _ in prompts]
        ids, padding = left_pad(prompts, pad_id)
        attn = self._tensor((np.arange(ids.shape[1])[None, :] >= padding[:, None]).astype(np.int64))
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)

        def forward(tokens: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> np.ndarray:
            out = self.model(input_ids=tokens, attention_mask=attn, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float().cpu().numpy()

        state = {"attn": attn, "pos": pos[:, -1:]}

        def step(tokens: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
            if keep is not None:  # drop finished rows from the cache and the mask
                idx = torch.from_numpy(keep).to(self.device)
                cache.batch_select_indices(idx)
                state["attn"], state["pos"] = state["attn"][idx], state["pos"][idx]
            state["attn"] = torch.cat([state["attn"], state["attn"].new_ones((len(tokens), 1))], dim=1)
            state["pos"] = state["pos"] + 1
            return forward(self._tensor(tokens).long()[:, None], state["attn"], state["pos"])

        was_training = self.model.training
        self.model.eval()
        try:
            if self.virtual is not None:  # virtual tokens ahead of each row (backends/torch_virtual.py)
                return generate_virtual(self.virtual, prompts, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                        eos_ids=eos_ids, pad_id=pad_id, adapter=adapter, should_stop=should_stop,
                                        device=self.device)
            with nullcontext() if adapter else self.model.disable_adapter():
                first = forward(self._tensor(ids).long(), attn, pos)
                return decode_loop(first, step, max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                   eos_ids=eos_ids, should_stop=should_stop)
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
        }
