"""Adapter bookkeeping shared by every backend: which blocks, and the initial weights.

The initial LoRA weights are drawn here, once, with numpy, and loaded into whichever backend
runs; that is what makes step-by-step comparisons between backends possible.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxtune.errors import MlxtuneError

# DoRA's trained magnitude per output row, (out,), next to "<module>.lora_A" / "<module>.lora_B"
MAGNITUDE = "lora_magnitude"


def select_layers(num_layers: int, spec: str | int | list[int]) -> list[int]:
    """Block indices that get adapters: "all", the last N, or an explicit list."""
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, int):
        if spec > num_layers:
            raise MlxtuneError(f"adapter.layers = {spec} but the model has only {num_layers} blocks")
        return list(range(num_layers - spec, num_layers))
    bad = [i for i in spec if not 0 <= i < num_layers]
    if bad:
        raise MlxtuneError(f"adapter.layers: block indices {bad} out of range for a model with {num_layers} blocks (0..{num_layers - 1})")
    return sorted(set(spec))


def init_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, np.ndarray]:
    """LoRA init as PEFT does it: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)),
    B = 0, so the adapted model starts equal to the base model.

    ``shapes`` maps module path -> (in_features, out_features). Each module draws from its own
    stream seeded by (seed, crc32 of its path), so its values do not depend on dict order or on
    which other modules are adapted.

    DoRA's magnitudes are not drawn here: they start as the row norms of the base weight (plus
    scale * B @ A, i.e. of W itself since B = 0), which only the backend holds; see
    :func:`check_weight_keys`.
    """
    weights = {}
    for name in sorted(shapes):
        fan_in, fan_out = shapes[name]
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        bound = 1.0 / np.sqrt(fan_in)
        weights[f"{name}.lora_A"] = rng.uniform(-bound, bound, size=(rank, fan_in)).astype(np.float32)
        weights[f"{name}.lora_B"] = np.zeros((fan_out, rank), dtype=np.float32)
    return weights


# ---------------------------------------------------------------- the weight dict of each kind


def check_weight_keys(weights: Iterable[str], modules: Iterable[str], dora: bool) -> bool:
    """Check the keys of an adapter weight dict against the adapted modules (ValueError naming what
    is missing or unexpected). For DoRA the magnitudes may be left out as a whole: the backend
    then initialises them as DoRA does, from the base weights it holds (the core's
    :func:`init_lora` cannot). Returns whether magnitudes are present."""
    modules = list(modules)
    ab = {f"{p}.lora_{s}" for p in modules for s in "AB"}
    mags = {f"{p}.{MAGNITUDE}" for p in modules} if dora else set()
    keys = set(weights)
    if keys == ab | mags:
        return bool(mags)
    if dora and keys == ab:
        return False
    missing, extra = sorted((ab | mags) - keys), sorted(keys - ab - mags)
    raise ValueError(f"adapter weights do not match the model's {'DoRA' if dora else 'LoRA'} adapter: "
                     f"missing {missing[:4]}, unexpected {extra[:4]}")


# ---------------------------------------------------------------- adapter folders of either backend


@dataclass
class AdapterFile:
    """An adapter folder read into the backend-neutral weight dict."""

    kind: str  # "lora", "dora", or another PEFT type in lower case
    rank: int | None
    scale: float | None
    fmt: str  # "mlx" (mlx-lm's adapters.safetensors) or "peft" (adapter_model.safetensors)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)  # tensors that are no LoRA/DoRA weight


def read_adapter(path: Path, load: Callable[[Path], dict[str, np.ndarray]]) -> AdapterFile:
    """Read an adapter folder in mlx-lm's layout (``<module>.lora_a`` (in, r), ``.lora_b``
    (r, out), DoRA's ``.m``) or PEFT's (``base_model.model.<module>.lora_A.weight`` (r, in),
    ``.lora_B.weight``, DoRA's ``.lora_magnitude_vector``) into the boundary layout. ``load``
    reads a safetensors file into float32 numpy arrays with the backend's framework (numpy alone
    cannot read bfloat16)."""
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise MlxtuneError(f"{path}: no adapter_config.json (not an adapter folder)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if (path / "adapters.safetensors").is_file():
        lp = cfg.get("lora_parameters", {})
        out = AdapterFile(cfg.get("fine_tune_type", "lora"), lp.get("rank"), lp.get("scale"), "mlx")
        for k, v in load(path / "adapters.safetensors").items():
            module, leaf = k.rsplit(".", 1) if "." in k else ("", k)
            if leaf in ("lora_a", "lora_b"):
                out.weights[f"{module}.lora_{leaf[-1].upper()}"] = np.ascontiguousarray(v.T)
            elif leaf == "m":
                out.weights[f"{module}.{MAGNITUDE}"] = v
            else:
                out.other.append(k)
        return out
    if (path / "adapter_model.safetensors").is_file():
        peft_type = str(cfg.get("peft_type", "LORA"))
        kind = ("dora" if cfg.get("use_dora") else "lora") if peft_type == "LORA" else peft_type.lower()
        rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
        scale = None
        if rank and alpha is not None:
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        out = AdapterFile(kind, rank, scale, "peft")
        for k, v in load(path / "adapter_model.safetensors").items():
            name = k.removeprefix("base_model.model.")
            if name.endswith((".lora_A.weight", ".lora_B.weight")):
                out.weights[name.removesuffix(".weight")] = v
            elif name.endswith(".lora_magnitude_vector"):
                out.weights[name.removesuffix(".lora_magnitude_vector") + "." + MAGNITUDE] = v
            else:
                out.other.append(k)
        return out
    raise MlxtuneError(f"{path}: no adapters.safetensors (mlx-lm) or adapter_model.safetensors (PEFT)")


def check_adapter(af: AdapterFile, path: Path, method: str, rank: int, scale: float, modules: Iterable[str]) -> None:
    """Refuse an adapter file that is not the recipe's adapter: kind (LoRA for lora and qlora, DoRA
    for dora), rank, scale and the set of tensors, each named in one line."""
    want = "dora" if method == "dora" else "lora"
    if af.kind != want or af.rank != rank:
        raise MlxtuneError(f"{path}: adapter ({af.kind}, rank {af.rank}) does not match the recipe ({want}, rank {rank}); "
                           + ("set adapter.method to match the adapter" if af.kind in ("lora", "dora") and af.rank == rank
                              else "load it with the recipe it was trained with"))
    if af.scale is None or not math.isclose(float(af.scale), scale, rel_tol=1e-6):
        raise MlxtuneError(f"{path}: adapter scale {af.scale} != the recipe's alpha / rank = {scale:g}")
    modules = list(modules)
    expected = {f"{p}.lora_{s}" for p in modules for s in "AB"} | ({f"{p}.{MAGNITUDE}" for p in modules} if want == "dora" else set())
    if set(af.weights) != expected or af.other:
        missing, extra = sorted(expected - set(af.weights)), sorted(set(af.weights) - expected) + af.other
        raise MlxtuneError(f"{path}: adapter tensors do not match the recipe's adapter (missing {missing[:3]}, unexpected {extra[:3]})")


def load_lora_folder(path: Path, adapter: Any, modules: Iterable[str],
                     load: Callable[[Path], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The boundary weights of a LoRA/DoRA folder in either format (:func:`read_adapter`),
    refused unless it is the recipe's adapter (``adapter``: the recipe's ``AdapterConfig``)."""
    af = read_adapter(Path(path), load)
    check_adapter(af, Path(path), adapter.method, adapter.rank, adapter.scale, modules)
    return af.weights


# ---------------------------------------------------------------- the other format, next to the native one

# Each backend writes its native format at the top of an adapter folder (torch: PEFT, MLX: mlx-lm)
# and the other one in a subfolder, since both formats name their config adapter_config.json.
PEFT_DIR, MLX_DIR = "peft", "mlx"
_BLOCK = re.compile(r"^(?P<stem>.*\.layers)\.(?P<i>\d+)\.(?P<rel>.+)$")


@dataclass
class LoraSpec:
    """What either format's adapter_config.json says about a LoRA/DoRA adapter."""

    rank: int
    alpha: float
    dropout: float
    dora: bool
    target_modules: list[str]
    num_blocks: int  # blocks in the base model
    base_model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # more for mlx-lm's config "mlxtune" section


def _modules(weights: dict[str, np.ndarray]) -> list[str]:
    return sorted({k.rsplit(".", 1)[0] for k in weights if k.endswith(".lora_A")})


def _save_safetensors(file: Path, tensors: dict[str, np.ndarray], fmt: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(file), metadata={"format": fmt})


def write_peft(path: Path, weights: dict[str, np.ndarray], spec: LoraSpec) -> None:
    """PEFT's ``adapter_model.safetensors`` (``lora_A`` (r, in), ``lora_B`` (out, r), DoRA's
    ``lora_magnitude_vector``) + ``adapter_config.json`` in folder ``path``, from boundary-layout
    ``weights``: loadable by stock ``peft.PeftModel.from_pretrained``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in weights.items():
        module, leaf = k.rsplit(".", 1)
        name = "lora_magnitude_vector" if leaf == MAGNITUDE else f"{leaf}.weight"
        tensors[f"base_model.model.{module}.{name}"] = v
    layers = sorted({int(m.group("i")) for m in map(_BLOCK.match, _modules(weights)) if m})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": spec.base_model,
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_dora": spec.dora,
        "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": sorted(spec.target_modules),
        "layers_to_transform": None if layers == list(range(spec.num_blocks)) else layers,
    }
    _save_safetensors(path / "adapter_model.safetensors", tensors, "pt")
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def mlx_lm_layout(modules: Iterable[str], num_blocks: int) -> tuple[int, list[str], list[int]]:
    """mlx-lm's ``num_layers`` (it adapts the last N blocks), ``keys`` (module paths inside a
    block) and the adapted block indices, for the adapted module paths. MlxtuneError naming a
    module that is in no block (mlx-lm's format adapts block layers only)."""
    blocks, keys = set(), set()
    for p in modules:
        m = _BLOCK.match(p)
        if not m or m.group("stem") != "model.layers":
            raise MlxtuneError(f"{p}: mlx-lm's adapter format adapts only layers inside the blocks model.layers.N; "
                               "this adapter is written in PEFT's format only")
        blocks.add(int(m.group("i")))
        keys.add(m.group("rel"))
    return (num_blocks - min(blocks) if blocks else 0), sorted(keys), sorted(blocks)


def write_mlx_lm(path: Path, weights: dict[str, np.ndarray], spec: LoraSpec) -> None:
    """mlx-lm's ``adapters.safetensors`` (``lora_a`` (in, r), ``lora_b`` (r, out), DoRA's ``m``)
    + ``adapter_config.json`` in folder ``path``: loadable by stock ``mlx_lm.load(..., adapter_path=)``.

    mlx-lm's config knows only "the last N blocks, these keys in each". Other layer lists (e.g.
    [0] of 2 blocks) are written exactly all the same: mlx-lm gives the blocks and keys in that
    range that mlxtune did not adapt a fresh adapter with ``lora_b`` = 0 (its loader fills in only
    the tensors in the file), which changes no output; the config's ``mlxtune.note`` says so."""
    path = Path(path)
    num_layers, keys, layers = mlx_lm_layout(_modules(weights), spec.num_blocks)
    tensors = {}
    for k, v in weights.items():
        module, leaf = k.rsplit(".", 1)
        tensors[f"{module}.m" if leaf == MAGNITUDE else f"{module}.lora_{leaf[-1].lower()}"] = v if leaf == MAGNITUDE else v.T
    meta = {"alpha": spec.alpha, "layers": layers, "target_modules": list(spec.target_modules),
            "base_model": spec.base_model, "method": "dora" if spec.dora else "lora", **spec.extra}
    padded = len(layers) * len(keys) != len(_modules(weights)) or layers != list(range(spec.num_blocks - num_layers, spec.num_blocks))
    if padded:
        meta["note"] = (f"mlxtune adapted blocks {layers} only; mlx-lm adapts the last {num_layers} blocks with keys {keys}, "
                        "and the layers not in adapters.safetensors keep lora_b = 0 (no change to the output)")
    cfg = {
        "fine_tune_type": "dora" if spec.dora else "lora", "num_layers": num_layers,
        "lora_parameters": {"rank": spec.rank, "scale": spec.alpha / spec.rank, "dropout": spec.dropout, "keys": keys},
        "mlxtune": meta,
    }
    path.mkdir(parents=True, exist_ok=True)
    _save_safetensors(path / "adapters.safetensors", tensors, "mlx")
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def write_mlx_lm_or_say_why(path: Path, weights: dict[str, np.ndarray], spec: LoraSpec) -> str | None:
    """:func:`write_mlx_lm`, or, where mlx-lm's format cannot hold the adapter, ``path``/WHY_NOT.txt
    with the reason (returned); the adapter folder stays complete in PEFT's format."""
    try:
        write_mlx_lm(path, weights, spec)
        return None
    except MlxtuneError as e:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "WHY_NOT.txt").write_text(str(e) + "\n", encoding="utf-8")
        return str(e)
