"""`mlxtune export RUN --format merged OUT`: the run's LoRA/DoRA adapter folded into the base
weights, written as a standard Hugging Face folder that stock transformers and stock mlx-lm load.

Framework-free: weights are read and written with numpy (``mlxtune/models/safetensors_io.py``) and merged in
float64, then cast once to the export dtype. LoRA: W' = W + s B A. DoRA as peft merges it:
W' = m / ||W + s B A|| * (W + s B A), the norm taken per output row. The folder is written under
a temporary name beside OUT and renamed into place, so OUT is never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxtune.adapters.lora import MAGNITUDE, load_lora_folder, select_layers
from mlxtune.errors import MlxtuneError
from mlxtune.models import safetensors_io as st
from mlxtune.models.gguf_base import stated_quantization
from mlxtune.recipe.schema import Recipe
from mlxtune.runs.rundir import BEST, FINAL, RECIPE, RunDir, locked_if_run, read_recipe

DTYPES = ("float16", "bfloat16", "float32")
SHARD_BYTES = 2 * 1024**3  # shard size of the safetensors written (transformers' own default is 5 GB)
# files of the base folder that are not copied: its weights, its config (rewritten) and mlxtune's marker
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".index.json", ".lock")
_SKIP_NAMES = {"config.json", "mlxtune-source.json", "generation_config.json"}

Progress = Callable[[int, int], None]  # (bytes done, bytes in all)
Dequant = Callable[[str, np.ndarray], "np.ndarray | None"]  # (name, base tensor) -> the tensor to merge and write, or None: drop it


@dataclass
class MergedExport:
    """What :func:`export_merged` wrote."""

    path: Path
    adapter: Path
    method: str
    dtype: str
    merged_modules: int
    tensors: int
    bytes: int
    shards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_recipe(run: Path) -> Recipe:
    """The recipe the run used (its recipe.resolved.toml), typed."""
    from mlxtune.recipe.loading import recipe_from_dict

    if not RunDir(run).is_run():
        raise MlxtuneError(f"{run}: not a run directory (no metrics.jsonl); give the folder `mlxtune run` wrote, e.g. runs/<name>")
    raw = read_recipe(run)
    if raw is None:
        raise MlxtuneError(f"{run / RECIPE}: missing or not valid TOML; export needs the recipe the run was trained with")
    return recipe_from_dict(raw, where=str(run / RECIPE), planning=True)


def adapter_folder(run: Path, choice: str | None) -> Path:
    """``best`` (run/best/adapter), ``final`` (run/adapters) or a folder; default best if present, else final."""
    rd = RunDir(run)
    best = rd.best()
    if choice is None:
        choice = "best" if best else "final"
    if choice == "best":
        if best is None:
            raise MlxtuneError(f"{run / BEST}: missing (the run has no eval yet); use --adapter final or --adapter PATH")
        return best[1]
    if choice == "final":
        final = rd.final_adapter()
        if final is None:
            raise MlxtuneError(f"{run / FINAL}: missing (the run has not finished); let it finish, --resume it, or use --adapter best or PATH")
        return final
    path = Path(choice)
    if not path.is_dir():
        raise MlxtuneError(f"--adapter {choice}: no such folder; use best, final or the path of an adapter folder")
    return path


def export_source(run: Path, out: Path, adapter: str | None) -> tuple[Recipe, Path, Path]:
    """(the run's recipe, the adapter folder ``adapter`` names, the base model folder) of an export into
    ``out``, refusing an ``out`` that is one of them (the export would replace what it reads)."""
    from mlxtune.models.source import resolve_model

    recipe = run_recipe(run)
    path = adapter_folder(run, adapter)
    model_dir = Path(resolve_model(recipe.model.path, recipe.model.revision, recipe.model.trust_remote_code))
    if out.resolve() in (run.resolve(), path.resolve(), model_dir.resolve()):
        raise MlxtuneError(f"{out}: that is the run, its adapter or its base model folder; export into a new folder")
    return recipe, path, model_dir


def refuse_virtual(recipe: Recipe, adapter: Path) -> None:
    """Prompt and prefix tuning add tokens / key-value prefixes, not a weight delta: nothing to fold in."""
    method = recipe.adapter.method
    if method in ("prompt", "prefix"):
        raise MlxtuneError(f"{adapter}: {method} tuning adds learned virtual tokens, not a weight update, so it cannot be merged "
                           f"into the base weights; use the PEFT adapter folder {adapter} as it is (peft's "
                           f"PeftModel.from_pretrained(base, \"{adapter}\"))")


def adapted_modules(names: list[str], recipe: Recipe, num_layers: int) -> list[str]:
    """Module paths (``model.layers.<i>.<...>.<target>``) the recipe's adapter wraps, from the base's tensor names."""
    layers = set(select_layers(num_layers, recipe.adapter.layers))
    targets = set(recipe.adapter.target_modules)
    out = []
    for name in names:
        if not name.startswith("model.layers.") or not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        parts = module.split(".")
        if parts[2].isdigit() and int(parts[2]) in layers and parts[-1] in targets:
            out.append(module)
    return sorted(out)


def merge_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, magnitude: np.ndarray | None = None) -> np.ndarray:
    """W' of one linear (out, in) from A (r, in), B (out, r), in float64: LoRA, or DoRA with ``magnitude`` (out,)."""
    v = w.astype(np.float64) + scale * (b.astype(np.float64) @ a.astype(np.float64))
    if magnitude is None:
        return v
    norm = np.linalg.norm(v, axis=1)  # per output row, as peft's DoraLinearLayer.get_weight_norm
    return (magnitude.astype(np.float64) / norm)[:, None] * v


def base_dtype(model_dir: Path, config: dict[str, Any]) -> str:
    """The base's own float dtype as config.json names it (float32 when it names none we write)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return [model_dir / f for f in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))]
    return sorted(model_dir.glob("*.safetensors"))


def export_merged(run: str | Path, out: str | Path, dtype: str | None = None, adapter: str | None = None,
                  overwrite: bool = False, progress: Progress | None = None, shard_bytes: int = SHARD_BYTES) -> MergedExport:
    """Fold the run's adapter (``adapter``: best, final or a folder; see :func:`adapter_folder`)
    into the base weights and write the Hugging Face folder ``out`` in ``dtype`` (default: the
    base's). ``progress(done, total)`` is called in bytes of base weights processed."""
    from mlxtune.models.source import check_weights, model_config

    run, out = Path(run), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise MlxtuneError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if out.exists() and not overwrite:
        raise MlxtuneError(f"{out}: already exists; choose another output name or pass --overwrite")
    with locked_if_run(run):
        recipe, path, model_dir = export_source(run, out, adapter)
        refuse_virtual(recipe, path)
        config = model_config(model_dir)
        # mlx-lm writes its "quantization" also as "quantization_config"; transformers' methods write only the latter
        mode = config["quantization"].get("mode", "affine") if "quantization" in config else stated_quantization(config, model_dir)
        if mode not in (None, "affine"):
            raise MlxtuneError(f"{model_dir}/config.json: weights quantized with {mode} cannot be de-quantized here; train from "
                               "the full-precision model folder (the run quantizes it at load with model.quantize_bits) or from "
                               "an mlx-lm affine-quantized one")
        check_weights(model_dir)
        dtype = dtype or base_dtype(model_dir, config)
        files = _weight_files(model_dir)
        headers = {f: st.read_header(f)[1] for f in files}
        names = [n for h in headers.values() for n in h]
        modules = adapted_modules(names, recipe, int(config["num_hidden_layers"]))
        weights = load_lora_folder(path, recipe.adapter, modules, st.read_float32)
        result = MergedExport(out, path, recipe.adapter.method, dtype, len(modules), 0, 0)
        where = {n: f for f, h in headers.items() for n in h}
        dequant = _folder_dequantizer(config, where, model_dir, result) or _dequantizer(recipe, model_dir, result)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _write_weights(tmp, files, headers, weights, recipe.adapter.scale, recipe.adapter.method == "dora", result,
                           progress, shard_bytes, dequant)
            _write_side_files(model_dir, tmp, config, dtype)
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result


def _dequantizer(recipe: Recipe, model_dir: Path, result: MergedExport) -> Dequant | None:
    """For a run on a quantized base: what turns a base matrix into the de-quantized one the
    adapter was trained on (the MLX backend's affine quantization, reproduced with mlx itself),
    with a note saying so; None for a full-precision base."""
    bits, group = recipe.model.quantize_bits or (4 if recipe.adapter.method == "qlora" else 0), recipe.model.quantize_group_size
    if not bits:
        return None
    if recipe.backend != "mlx":
        result.notes.append(f"the run trained on a {bits}-bit bitsandbytes base; the adapter is merged into the full-precision "
                            f"weights of {model_dir} it was quantized from, so the logits differ from the run's by the quantization error")
        return None
    try:
        import mlx.core as mx
    except ImportError:
        raise MlxtuneError(f"the run trained on a {bits}-bit MLX-quantized base; de-quantizing it as the run saw it needs mlx: "
                           "pip install 'mlxtune[mlx]'") from None
    compute = getattr(mx, recipe.model.dtype)  # the backend quantizes the weights after casting them to model.dtype

    def roundtrip(name: str, w: np.ndarray) -> np.ndarray:
        if not (name.endswith(".weight") and w.ndim == 2 and np.issubdtype(w.dtype, np.floating)):
            return w  # norms and biases are not quantized
        q = mx.quantize(mx.array(np.asarray(w, dtype=np.float32)).astype(compute), group_size=group, bits=bits, mode="affine")
        return np.array(mx.dequantize(*q, group_size=group, bits=bits, mode="affine").astype(mx.float32))

    result.notes.append(f"the run trained on a base quantized to {bits} bits (MLX affine, group {group}): the adapter is merged "
                        "into that base de-quantized, so the export computes what the run did, in full precision")
    return roundtrip


def _folder_dequantizer(config: dict[str, Any], where: dict[str, Path], model_dir: Path, result: MergedExport) -> Dequant | None:
    """For a base folder quantized by mlx-lm (config.json's "quantization"): each packed weight
    de-quantized with its scales and biases (which are then not written), as the run computed it."""
    found = config.get("quantization")
    if not found:
        return None
    try:
        import mlx.core as mx
    except ImportError:
        raise MlxtuneError(f"{model_dir} holds mlx-lm quantized weights; de-quantizing them needs mlx: pip install 'mlxtune[mlx]'") from None
    bits, group = int(found["bits"]), int(found["group_size"])
    packed = {n.removesuffix(".scales") for n in where if n.endswith(".scales") and f"{n.removesuffix('.scales')}.weight" in where}

    def dequant(name: str, w: np.ndarray) -> np.ndarray | None:
        module, _, leaf = name.rpartition(".")
        if module not in packed:
            return w
        if leaf != "weight":
            return None  # scales / biases: folded into the de-quantized weight
        sb = [st.read_tensors(where[f"{module}.{k}"], [f"{module}.{k}"])[f"{module}.{k}"] for k in ("scales", "biases")]
        return np.array(mx.dequantize(mx.array(w), *(mx.array(x) for x in sb), group_size=group, bits=bits).astype(mx.float32))

    result.notes.append(f"the base folder is quantized ({bits}-bit affine, group {group}, by mlx-lm): it is de-quantized and "
                        "the adapter merged into it, so the export computes what the run did, in full precision")
    return dequant


def _write_weights(tmp: Path, files: list[Path], headers: dict[Path, dict[str, Any]], weights: dict[str, np.ndarray],
                   scale: float, dora: bool, result: MergedExport, progress: Progress | None, shard_bytes: int,
                   dequant: Dequant | None = None) -> None:
    """Merge and cast every base tensor, one at a time, into shards of at most ``shard_bytes``;
    ``dequant``: the quantize -> de-quantize round trip of the run's quantized base, on every matrix."""
    def nbytes(f: Path, name: str) -> int:
        a, b = headers[f][name]["data_offsets"]
        return b - a
    total = sum(nbytes(f, n) for f in files for n in headers[f])
    done = 0
    shards: list[list[tuple[str, str, tuple[int, ...], bytes]]] = [[]]
    size = 0
    for f in files:
        for name, arr in st.iter_tensors(f, list(headers[f])):
            done += nbytes(f, name)
            if progress:
                progress(done, total)
            if dequant is not None and (arr := dequant(name, arr)) is None:
                continue
            module = name.removesuffix(".weight")
            result.tensors += 1
            if f"{module}.lora_A" in weights:
                mag = weights[f"{module}.{MAGNITUDE}"] if dora else None
                arr = merge_weight(arr, weights[f"{module}.lora_A"], weights[f"{module}.lora_B"], scale, mag)
            entry = st.to_dtype(arr, result.dtype) if np.issubdtype(arr.dtype, np.floating) else st.raw_bytes(arr)
            if size and size + len(entry[1]) > shard_bytes:
                _flush(tmp, shards, result)
                shards, size = shards + [[]], 0
            shards[-1].append((name, entry[0], tuple(arr.shape), entry[1]))
            size += len(entry[1])
    _flush(tmp, shards, result, last=True)


def _flush(tmp: Path, shards: list[list[tuple[str, str, tuple[int, ...], bytes]]], result: MergedExport, last: bool = False) -> None:
    """Write the newest shard under a provisional name; on ``last``, name them all and write the index."""
    entries = shards[-1]
    if entries:
        st.write_file(tmp / f"part-{len(shards):05d}.safetensors", entries)
        result.bytes += sum(len(e[3]) for e in entries)
        entries.clear()  # written: keep only the names (below) in memory
    if not last:
        return
    n = len(shards)
    if n == 1:
        os.replace(tmp / "part-00001.safetensors", tmp / "model.safetensors")
        result.shards = ["model.safetensors"]
        return
    weight_map = {}
    for i in range(1, n + 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f"part-{i:05d}.safetensors", tmp / name)
        for tensor in st.read_header(tmp / name)[1]:
            weight_map[tensor] = name
        result.shards.append(name)
    index = {"metadata": {"total_size": result.bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_side_files(model_dir: Path, tmp: Path, config: dict[str, Any], dtype: str) -> None:
    """config.json (with a top-level rope_theta for mlx-lm, the export's dtype), tokenizer files with
    the chat template, generation_config.json (the base's, else its bos/eos ids)."""
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name not in _SKIP_NAMES and not p.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(p, tmp / p.name)
    config = {k: v for k, v in config.items() if k not in ("torch_dtype", "quantization", "quantization_config")} | {"dtype": dtype}
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        shutil.copy2(gen, tmp / gen.name)
    else:
        ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
        (tmp / gen.name).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")


def _replace(tmp: Path, out: Path) -> None:
    """``tmp`` renamed to ``out``; an existing ``out`` (--overwrite) is moved aside first and dropped after."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
