"""A GGUF file as the base model: its header checked, its weights de-quantized once into a cache folder.

transformers reads GGUF files of the architectures its ggml integration maps; mlxtune converts such
a file once (de-quantized to float32, tokenizer and chat template included) into a Hugging Face
folder that both backends load, and records in the folder's marker (``mlxtune-source.json``) that
the weights are the de-quantized GGUF's, not the original checkpoint's. The header is checked
before anything heavy runs: a file that is not a GGUF, or an architecture transformers cannot read,
is refused in one line. This module knows nothing of where the cache lives (models/source.py does).
No framework is imported at module level.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlxtune.errors import MlxtuneError

if TYPE_CHECKING:
    import numpy as np

MARKER = "mlxtune-source.json"
# transformers' names that llama.cpp spells differently in general.architecture
_GGUF_SPELLING = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "minimax_m2": "minimax-m2"}
# keys of transformers' GGUF_CONFIG_MAPPING that are no decoder mlxtune could train (t5: encoder-decoder)
_NOT_DECODERS = {"general", "tokenizer", "t5", "umt5", "t5encoder"}
_FIX = "give a .gguf model file (llama.cpp's format), a Hugging Face-format folder or a hub id 'org/name'"


@dataclass(frozen=True)
class GgufHeader:
    """What mlxtune reads from a GGUF header: ``general.architecture`` and the weights' quantization."""

    architecture: str
    quantization: str  # "Q4_K_M", "Q8_0", "F16", ...

    @property
    def note(self) -> str:
        return f"the weights are the de-quantized GGUF's ({self.quantization} -> float32), not the original checkpoint's"


# Llama 3.1/3.2/3.3's "llama3" rope besides its factor (the same in all of them). llama.cpp stores this rope as
# a `rope_freqs` tensor, which transformers' GGUF reader ignores: it would read such a model with the default rope.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_rope_factors(config: dict) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` for a config.json with the "llama3" rope (None for any other rope): per
    frequency, the divisor of the default inverse frequency, as llama.cpp's converter computes it (high
    frequencies kept, low ones divided by ``factor``, a smooth ramp between)."""
    import numpy as np

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    theta = float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)
    factor, low, high = float(rope.get("factor", 8.0)), float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    context = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * np.pi * theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ramp = 1 / ((1 - (context / wavelen - low) / (high - low)) / factor + (context / wavelen - low) / (high - low))
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, ramp)).astype(np.float32)


def rope_from_freqs(path: Path, config: dict) -> dict | None:
    """The ``rope_parameters`` a GGUF's ``rope_freqs`` tensor stands for (None when it has none): Llama 3's
    rope with the factor the tensor holds, checked by recomputing the tensor; anything else is refused,
    since transformers would read the model with the default rope, silently."""
    import numpy as np
    from gguf import GGUFReader

    tensor = next((t for t in GGUFReader(str(path)).tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    freqs = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta") or 10000.0
    rope = {"rope_type": "llama3", "rope_theta": float(theta), "factor": float(freqs.max()), **LLAMA3_ROPE}
    want = llama3_rope_factors(config | {"rope_parameters": rope}) if config.get("model_type") == "llama" else None
    if want is None or want.shape != freqs.shape or not np.allclose(want, freqs, rtol=1e-5):
        raise MlxtuneError(f"{path}: its rope_freqs tensor is not Llama 3's rope (transformers would ignore it and read the "
                           "model with the default rope); use the model's Hugging Face-format folder or repo")
    return rope


def gguf_file(spec: str) -> Path:
    """The GGUF file a recipe names, resolved; a missing path or a folder is an error naming it."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise MlxtuneError(f"{spec}: no such GGUF file: check the path, or name a Hugging Face-format folder "
                           "or hub id 'org/name' instead")
    if not path.is_file():
        raise MlxtuneError(f"{spec} is not a file: {_FIX}")
    return path.resolve()


def read_header(path: Path) -> GgufHeader:
    """The header of a GGUF file, with the gguf package (no tensor is read)."""
    if importlib.util.find_spec("gguf") is None:
        raise MlxtuneError(f"reading {path} needs the gguf package: pip install gguf")
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(str(path))
        fields = reader.fields
        arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    except Exception as e:  # numpy and gguf raise ValueError, IndexError, ... for a file that is no GGUF
        size = path.stat().st_size
        raise MlxtuneError(f"{path} is not a GGUF file ({size} bytes; {type(e).__name__}: {e}): {_FIX}") from None
    if not isinstance(arch, str) or not arch:
        raise MlxtuneError(f"{path}: the GGUF header names no general.architecture: re-convert the model with llama.cpp")
    kind = None
    if "general.file_type" in fields:
        try:
            kind = LlamaFileType(int(fields["general.file_type"].contents())).name.removeprefix("MOSTLY_")
        except (ValueError, TypeError):
            kind = None
    if kind is None:  # the most common tensor type stands for the file
        counts = Counter(t.tensor_type.name for t in reader.tensors)
        kind = counts.most_common(1)[0][0] if counts else "unknown"
    return GgufHeader(arch, kind)


def readable_architectures() -> list[str]:
    """``general.architecture`` values transformers can load, as llama.cpp spells them: the keys
    of its ggml integration's GGUF_CONFIG_MAPPING, plus its newer loader's GGUF_ARCHS."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    names = {_GGUF_SPELLING.get(a, a) for a in GGUF_CONFIG_MAPPING if a not in _NOT_DECODERS}
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:  # transformers before the packed-GGUF loader
        GGUF_ARCHS = {}
    return sorted(names | set(GGUF_ARCHS))


def check_architecture(header: GgufHeader, path: Path) -> None:
    """Refuse an architecture transformers cannot read from GGUF, naming the ones it can."""
    readable = readable_architectures()
    if header.architecture not in readable:
        raise MlxtuneError(f"{path}: GGUF architecture {header.architecture!r} cannot be read by transformers "
                           f"(it reads: {', '.join(readable)}); use the model's Hugging Face-format folder or repo")


def needs_frameworks(what: str) -> None:
    """Refuse before converting when torch, transformers or gguf is missing."""
    for module, package in (("torch", "torch (CPU: pip install torch==2.13.0)"),
                            ("transformers", "'transformers>=5'"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            raise MlxtuneError(f"converting {what} needs {module}: pip install {package}")


def header_config(path: Path, fix_config: Callable[[dict], dict]) -> dict:
    """config.json as transformers builds it from a GGUF header (for the planner, before a conversion)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    config.pop("quantization_config", None)
    return fix_config(config)


def is_converted(target: Path, source: dict) -> bool:
    """Whether ``target`` holds a finished conversion of ``source`` (the identity keys in its marker);
    other keys in the marker (the note) do not count, so older caches stay valid."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and all(marker.get(k) == v for k, v in source.items())


def convert_once(gguf: Path, target: Path, source: dict, label: str, fix_config: Callable[[dict], dict],
                 template_fix: str | None = None) -> Path:
    """``target`` converted from ``gguf`` unless its marker already matches ``source``: into a temp
    folder beside it, renamed into place when complete (a stale folder is replaced). ``template_fix``:
    refuse a GGUF without a chat template, with this fix."""
    if is_converted(target, source):
        return target  # fast path: no framework import
    needs_frameworks(label)
    header = read_header(gguf)
    check_architecture(header, gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed conversion
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    print(f"converting {label} to safetensors (once): {header.note} ...", file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        convert(gguf, tmp, fix_config, template_fix)
        marker = source | {"architecture": header.architecture, "gguf_quantization": header.quantization,
                           "note": header.note}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last: marks it complete
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes it private; make it an ordinary cache folder
            path.chmod(0o755 if path.is_dir() else 0o644)
        if not is_converted(target, source):  # else a concurrent conversion finished first
            if target.exists():  # stale: an older conversion format or another GGUF
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(gguf: Path, out: Path, fix_config: Callable[[dict], dict], template_fix: str | None = None) -> None:
    """De-quantize ``gguf`` into ``out`` as a float32 Hugging Face folder (no quantization_config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:  # transformers >= 5.2x could keep GGUF blocks packed (with `kernels`): ask for plain tensors
        from transformers import GgufConfig

        unpack = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        unpack = {}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **unpack)
    except (ValueError, KeyError) as e:  # an architecture transformers maps but cannot build as a causal LM
        raise MlxtuneError(f"{gguf}: transformers cannot load it as a causal LM ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); use the model's "
                           "Hugging Face-format folder or repo") from None
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one and copy weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rope = rope_from_freqs(gguf, config.to_dict())
    if rope is not None:  # the rope is no weight: the rebuilt model computes it from the config
        config.rope_parameters = rope
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if template_fix and not tokenizer.chat_template:
        raise MlxtuneError(f"{gguf} carries no chat template: {template_fix}")
    tokenizer.save_pretrained(out)

    path = out / "config.json"  # one config both frameworks read the same way
    data = fix_config(json.loads(path.read_text()))
    data.pop("quantization_config", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def float_weights(model_dir: Path) -> bool:
    """Whether the folder has *.safetensors weights and every tensor in them is plain floating point:
    a folder transformers converted from a GGUF keeps ``quantization_config: {quant_method: gguf}``
    in config.json although its weights are such floats."""
    from mlxtune.models.safetensors_io import FLOAT_CODES, read_header as tensors

    files = sorted(Path(model_dir).glob("*.safetensors"))
    floats = set(FLOAT_CODES.values())
    try:
        return bool(files) and all(t.get("dtype") in floats for f in files for t in tensors(f)[1].values())
    except (OSError, ValueError, AttributeError):
        return False


def stated_quantization(config: dict, model_dir: Path) -> str | None:
    """The ``quant_method`` of config.json's ``quantization_config`` (GPTQ, AWQ, bitsandbytes, ...), or
    None: no such key, or a folder transformers converted from a GGUF, which keeps
    ``{quant_method: gguf}`` over plain float weights (:func:`float_weights`): an unquantized model."""
    if "quantization_config" not in config:
        return None
    method = (config["quantization_config"] or {}).get("quant_method", "unknown")
    return None if method == "gguf" and float_weights(model_dir) else method
