"""`mlxtune export RUN OUT --format peft | mlx`: the run's adapter as a stock loader reads it.

Every adapter folder a run writes holds both formats (``mlxtune/adapters/lora.py``: the native one
at the top, the other in ``peft/`` or ``mlx/``), so an export is mostly a copy of the right files;
a folder lacking one (``--adapter PATH`` of another tool) gets it written from its weights.
``--format mlx`` also writes the base folder mlx-lm needs to reproduce the run (a top-level
``rope_theta``, the weights linked, or de-quantized as the run saw them) and README.txt with the
mlx_lm command lines. Written under a temporary name beside OUT and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxtune.adapters.lora import MLX_DIR, PEFT_DIR, LoraSpec, load_lora_folder, write_mlx_lm, write_peft
from mlxtune.errors import MlxtuneError
from mlxtune.export.merge import (_SKIP_NAMES, _SKIP_SUFFIXES, _dequantizer, _replace, _weight_files, adapted_modules,
                                  export_source)
from mlxtune.models import safetensors_io as st
from mlxtune.recipe.schema import Recipe
from mlxtune.runs.rundir import locked_if_run

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "prefix_encoder.safetensors", "README.md")
MLX_FILES = ("adapter_config.json", "adapters.safetensors")
WHY_NOT = "WHY_NOT.txt"


@dataclass
class AdapterExport:
    """What :func:`export_adapter` wrote."""

    path: Path
    adapter: Path
    method: str
    fmt: str
    how: str  # "copied" (from the run's folder) or "written" (from the adapter's weights)
    base_weights: str = ""  # mlx only: "hard-linked", "copied" or "de-quantized"
    notes: list[str] = field(default_factory=list)


def _has(folder: Path, names: tuple[str, ...]) -> bool:
    return (folder / names[0]).is_file() and (folder / names[1]).is_file()


def _copy(src: Path, dest: Path, names: tuple[str, ...]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)


def _spec(recipe: Recipe, config: dict[str, Any], model_spec: str) -> LoraSpec:
    a = recipe.adapter
    return LoraSpec(a.rank, a.alpha, a.dropout, a.method == "dora", list(a.target_modules),
                    int(config["num_hidden_layers"]), model_spec)


def _weights(path: Path, recipe: Recipe, model_dir: Path, config: dict[str, Any]) -> dict:
    files = _weight_files(model_dir)
    names = [n for f in files for n in st.read_header(f)[1]]
    modules = adapted_modules(names, recipe, int(config["num_hidden_layers"]))
    return load_lora_folder(path, recipe.adapter, modules, st.read_float32)


def _write_peft(path: Path, recipe: Recipe, model_dir: Path, config: dict[str, Any], dest: Path) -> str:
    """The PEFT files of adapter folder ``path`` into ``dest``: copied where the folder has them
    (at its top or in peft/), else written from its LoRA/DoRA weights."""
    for src in (path, path / PEFT_DIR):
        if _has(src, PEFT_FILES):
            _copy(src, dest, PEFT_FILES)
            return "copied"
    if recipe.adapter.method in ("prompt", "prefix"):
        raise MlxtuneError(f"{path}: no adapter_model.safetensors; a {recipe.adapter.method} adapter folder is written by "
                           "mlxtune in PEFT's format: give the folder the run wrote (--adapter best or final)")
    write_peft(dest, _weights(path, recipe, model_dir, config), _spec(recipe, config, recipe.model.path))
    return "written"


def _mlx_source(path: Path, recipe: Recipe) -> Path | None:
    """The folder holding the mlx-lm files of ``path`` (None: to be written from the weights);
    refused, before anything is written, where mlx-lm's format cannot hold this adapter."""
    method = recipe.adapter.method
    if method in ("prompt", "prefix"):
        raise MlxtuneError(f"{path}: mlx-lm has no {method} tuning, so this adapter has no mlx-lm form; "
                           "use --format peft (stock peft loads it)")
    if (path / MLX_DIR / WHY_NOT).is_file():
        why = (path / MLX_DIR / WHY_NOT).read_text(encoding="utf-8").strip()
        raise MlxtuneError(f"{path / MLX_DIR / WHY_NOT}: {why}; use --format peft or --format merged")
    for src in (path, path / MLX_DIR):
        if _has(src, MLX_FILES):
            return src
    return None


def export_adapter(run: str | Path, out: str | Path, fmt: str, adapter: str | None = None,
                   overwrite: bool = False) -> AdapterExport:
    """Write the run's adapter (``adapter``: best, final or a folder) into folder ``out`` in
    ``fmt``: "peft" (the adapter folder itself) or "mlx" (``out/adapter`` + ``out/base`` + README.txt)."""
    from mlxtune.models.source import check_weights, model_config

    run, out = Path(run), Path(out)
    if fmt not in ("peft", "mlx"):
        raise MlxtuneError(f"--format {fmt}: export_adapter writes peft or mlx")
    if out.exists() and not overwrite:
        raise MlxtuneError(f"{out}: already exists; choose another output name or pass --overwrite")
    with locked_if_run(run):
        recipe, path, model_dir = export_source(run, out, adapter)
        mlx_src = _mlx_source(path, recipe) if fmt == "mlx" else None
        config = model_config(model_dir)
        check_weights(model_dir)
        result = AdapterExport(out, path, recipe.adapter.method, fmt, "copied")
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            if fmt == "peft":
                result.how = _write_peft(path, recipe, model_dir, config, tmp)
            else:
                if mlx_src is not None:
                    _copy(mlx_src, tmp / "adapter", MLX_FILES)
                else:
                    write_mlx_lm(tmp / "adapter", _weights(path, recipe, model_dir, config), _spec(recipe, config, recipe.model.path))
                    result.how = "written"
                _write_base(recipe, model_dir, config, tmp / "base", result)
                _write_readme(tmp, out)
            _replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return result


def _link_or_copy(src: Path, dest: Path) -> str:
    """A hard link where ``dest`` is on the same filesystem (no extra disk, survives moving OUT), else a copy."""
    try:
        os.link(src, dest)
        return "hard-linked"
    except OSError:
        shutil.copy2(src, dest)
        return "copied"


def _write_base(recipe: Recipe, model_dir: Path, config: dict[str, Any], dest: Path, result: AdapterExport) -> None:
    """The base folder for mlx-lm: config.json with a top-level rope_theta (mlx-lm 0.32 ignores
    transformers 5's rope_parameters and would use 10000), the tokenizer files, and the weights:
    linked as they are, or, for a run that quantized a full-precision base at load on the MLX
    backend, de-quantized as the run saw them (float32), which gives mlx-lm the run's logits."""
    from mlxtune.export.merge import MergedExport

    dest.mkdir(parents=True)
    for p in model_dir.iterdir():
        if p.is_file() and not p.name.startswith(".") and p.name not in _SKIP_NAMES and not p.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(p, dest / p.name)
    if (model_dir / "generation_config.json").is_file():
        shutil.copy2(model_dir / "generation_config.json", dest / "generation_config.json")
    files = _weight_files(model_dir)
    probe = MergedExport(dest, result.adapter, result.method, "float32", 0, 0, 0)
    dequant = None if "quantization" in config else _dequantizer(recipe, model_dir, probe)
    if dequant is not None:
        result.notes.append("the run quantized its base at load (MLX affine): base/ holds those weights de-quantized "
                            "(float32), which gives mlx-lm the run's logits")
    elif probe.notes:  # a bitsandbytes run: mlx-lm cannot reproduce that quantization
        result.notes.append("the run trained on a bitsandbytes-quantized base; base/ holds the full-precision weights "
                            "it was quantized from, so mlx-lm's logits differ from the run's by the quantization error")
    config = {k: v for k, v in config.items() if k != "torch_dtype"}
    if dequant is None:
        hows = {_link_or_copy(f, dest / f.name) for f in files}
        result.base_weights = "hard-linked" if hows == {"hard-linked"} else "copied"
    else:
        for f in files:
            entries = []
            for name, arr in st.iter_tensors(f, list(st.read_header(f)[1])):
                arr = dequant(name, arr)
                entry = st.to_dtype(arr, "float32") if arr.dtype.kind == "f" else st.raw_bytes(arr)
                entries.append((name, entry[0], tuple(arr.shape), entry[1]))
            st.write_file(dest / f.name, entries)
        config = {k: v for k, v in config.items() if k != "quantization_config"} | {"dtype": "float32"}
        result.base_weights = "de-quantized"
    index = model_dir / "model.safetensors.index.json"  # same tensor names and files either way
    if index.is_file():
        shutil.copy2(index, dest / index.name)
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_readme(tmp: Path, out: Path) -> None:
    base, ad = out.resolve() / "base", out.resolve() / "adapter"
    text = (f"mlx-lm files of an mlxtune run (stock mlx-lm reproduces it).\n\n"
            f"  mlx_lm.generate --model {base} --adapter-path {ad} --prompt \"hello\"\n"
            f"  mlx_lm.chat --model {base} --adapter-path {ad}\n"
            f"  mlx_lm.fuse --model {base} --adapter-path {ad} --save-path {out.resolve()}-fused\n\n"
            "In Python:\n"
            "  from mlx_lm.utils import load\n"
            f"  model, tokenizer = load(\"{base}\", adapter_path=\"{ad}\")\n")
    (tmp / "README.txt").write_text(text, encoding="utf-8")
