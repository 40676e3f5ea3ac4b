"""torch + transformers + peft backend (CUDA, MPS or CPU).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (tensors only); elsewhere the
process's peak resident set size (``getrusage``), which includes Python and the libraries.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlxtune.errors import MlxtuneError
from mlxtune.recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_PREFIX = "base_model.model."


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
    """Sum of next-token NLL under each mask: the one place the shift happens on torch.

    Only the masked positions are pushed through log-softmax, in float32.
    """
    logits = logits[:, :-1]
    targets = tokens[:, 1:]
    out = []
    for mask in masks:
        sel = mask[:, 1:]
        out.append(F.cross_entropy(logits[sel].float(), targets[sel].long(), reduction="sum"))
    return out


class TorchBackend:
    name = "torch"

    def __init__(self) -> None:
        self.model = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.recipe: Recipe | None = None
        self.last_grad_norm: float | None = None

    # -- loading --------------------------------------------------------------------
    def load(self, model_dir: Path, recipe: Recipe, layers: list[int]) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.recipe = recipe
        self.device = pick_device(recipe.model.device)
        self.dtype = DTYPES[recipe.model.dtype]
        torch.manual_seed(recipe.train.seed)
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=self.dtype, attn_implementation="sdpa",
            trust_remote_code=recipe.model.trust_remote_code,
        )
        base.config.use_cache = False
        n_layers = base.config.num_hidden_layers
        a = recipe.adapter
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
        missing = [t for t in a.target_modules if t not in linear_names]
        if missing:
            raise MlxtuneError(f"adapter.target_modules: {missing} not found in {model_dir.name}; its linear layers are: {', '.join(linear_names)}")
        config = LoraConfig(
            r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=list(a.target_modules),
            layers_to_transform=None if len(layers) == n_layers else layers, bias="none", task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, config).to(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        from peft.tuners.lora import LoraLayer

        return {name.removeprefix(PEFT_PREFIX): m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def adapter_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (m.in_features, m.out_features) for n, m in self._lora_modules().items()}

    def set_adapter_weights(self, weights: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, m in self._lora_modules().items():
                m.lora_A["default"].weight.copy_(torch.from_numpy(weights[f"{name}.lora_A"]))
                m.lora_B["default"].weight.copy_(torch.from_numpy(weights[f"{name}.lora_B"]))

    def get_adapter_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for name, m in self._lora_modules().items():
            out[f"{name}.lora_A"] = m.lora_A["default"].weight.detach().float().cpu().numpy()
            out[f"{name}.lora_B"] = m.lora_B["default"].weight.detach().float().cpu().numpy()
        return out

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    # -- training -------------------------------------------------------------------
    def setup_optimizer(self, recipe: Recipe) -> None:
        t = recipe.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
        self.optimizer.zero_grad(set_to_none=True)

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def train_step(self, tokens: np.ndarray, mask: np.ndarray, denom: int, update: bool, lr: float) -> float:
        self.model.train()
        tok = self._tensor(tokens).long()
        logits = self.model(input_ids=tok).logits
        (loss_sum,) = nll_sum(logits, tok, [self._tensor(mask)])
        (loss_sum / denom).backward()
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
        if adapter:
            logits = self.model(input_ids=tok).logits
        else:
            with self.model.disable_adapter():
                logits = self.model(input_ids=tok).logits
        names = list(masks)
        sums = nll_sum(logits, tok, [self._tensor(masks[n]) for n in names])
        return {n: float(s) for n, s in zip(names, sums)}

    # -- files ----------------------------------------------------------------------
    def save_adapter(self, path: Path) -> None:
        """PEFT format: adapter_model.safetensors + adapter_config.json."""
        self.model.save_pretrained(str(path), safe_serialization=True)

    def load_adapter(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        file = Path(path) / "adapter_model.safetensors"
        if not file.is_file():
            raise MlxtuneError(f"{path}: no adapter_model.safetensors (not a PEFT adapter folder)")
        result = set_peft_model_state_dict(self.model, load_file(str(file), device=str(self.device)))
        if getattr(result, "unexpected_keys", None):
            raise MlxtuneError(f"{path}: adapter does not match the recipe's model/adapter (unexpected keys such as {result.unexpected_keys[0]})")

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
            "threads": str(torch.get_num_threads()),
        }
