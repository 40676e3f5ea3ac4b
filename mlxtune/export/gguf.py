"""`mlxtune export RUN OUT --format gguf`: the merged model (``export_merged`` in float32, into a
temporary folder) written as one GGUF file for llama.cpp, Ollama, LM Studio and transformers.

Written with the ``gguf`` package (its writer, tensor-name map, Q8_0 quantizer and SpecialVocab),
the way llama.cpp's convert_hf_to_gguf.py writes these architectures, and checked against what
transformers' GGUF reader reads back. The LLAMA arch stores q_proj/k_proj rows permuted for
llama.cpp's interleaved rope (readers un-permute them); qwen2/qwen3 are stored as they are.
The file is written as ``.OUT.tmp-<pid>`` beside OUT and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxtune.errors import MlxtuneError
from mlxtune.export.merge import Progress, _weight_files, adapter_folder, export_merged, refuse_virtual, run_recipe
from mlxtune.models import safetensors_io as st
from mlxtune.models.gguf_base import llama3_rope_factors

OUTTYPES = ("f16", "q8_0", "f32")
# config.json's model_type -> (gguf architecture, q/k rows permuted for interleaved rope)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
# the split regex of a byte-level BPE tokenizer -> llama.cpp's tokenizer.ggml.pre name
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
PRE_NAMES = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


@dataclass
class GgufExport:
    """What :func:`export_gguf` wrote."""

    path: Path
    adapter: Path
    method: str
    arch: str
    outtype: str
    tensors: int = 0
    bytes: int = 0
    types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensors
    notes: list[str] = field(default_factory=list)


def check_arch(config: dict[str, Any], where: Path) -> tuple[str, bool]:
    """The GGUF architecture of a base config.json (and whether q/k rows are permuted), or a one-line refusal."""
    kind = str(config.get("model_type"))
    if kind not in ARCHS:
        raise MlxtuneError(f"{where}: model_type {kind!r} cannot be exported to GGUF here; supported: {', '.join(ARCHS)}; "
                           "use --format merged and llama.cpp's convert_hf_to_gguf.py")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in ("default", None) and not (rope_type == "llama3" and ARCHS[kind][0] == "llama"):
        raise MlxtuneError(f"{where}: rope scaling {rope_type!r} is not written to GGUF here (the default rope, and llama3's "
                           "for llama); use --format merged and llama.cpp's convert_hf_to_gguf.py")
    return ARCHS[kind]


@dataclass
class Vocab:
    """The tokenizer as GGUF stores it (llama.cpp's tokenizer.ggml.* keys)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (sentencepiece-style BPE with byte fallback)
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)


def read_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """The tokenizer.json of a byte-level BPE tokenizer (Llama 3, Qwen, SmolLM) or a sentencepiece
    BPE one with byte fallback (Llama 2, Mistral), padded to the model's ``n_vocab`` rows as
    llama.cpp does; a one-line refusal for any other tokenizer."""
    import gguf

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise MlxtuneError(f"{path}: missing; GGUF export needs the tokenizer.json of a BPE tokenizer")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    byte_level = (tok.get("decoder") or {}).get("type") == "ByteLevel" and not model.get("byte_fallback")
    if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
        raise MlxtuneError(f"{path}: a {model.get('type')} tokenizer is not written to GGUF here (BPE only: byte-level as "
                           "Llama 3, Qwen, SmolLM, or with byte fallback as Llama 2, Mistral); use --format merged and "
                           "llama.cpp's convert_hf_to_gguf.py")
    tokens: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tok.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        tokens[int(added["id"])] = (added["content"], kind)
    if max(tokens) >= n_vocab:
        raise MlxtuneError(f"{path}: token id {max(tokens)} is past the model's {n_vocab} embedding rows; the tokenizer does "
                           "not belong to this model")
    texts = [tokens.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))[0] for i in range(n_vocab)]
    types = [int(tokens.get(i, ("", gguf.TokenType.UNUSED))[1]) for i in range(n_vocab)]
    if byte_level:
        vocab = Vocab("gpt2", _pre_name(tok.get("pre_tokenizer") or {}), texts, types)
        if vocab.pre == "default":
            vocab.notes.append(f"{path}: its pre-tokenizer is not one llama.cpp names here (gpt-2, llama-bpe, qwen2, smollm); "
                               "written as 'default', so readers may split text before BPE differently")
        return vocab
    return _sentencepiece(tok, texts, types)


def _sentencepiece(tok: dict[str, Any], texts: list[str], types: list[int]) -> Vocab:
    """llama.cpp's "llama" tokenizer from a BPE tokenizer.json with byte fallback: byte tokens
    typed BYTE, the unknown token UNKNOWN, and each token's score minus the rank of the merge that
    makes it, so llama.cpp's highest-score-first merging applies the merges in BPE's order."""
    import re

    import gguf

    model = tok["model"]
    rank: dict[str, int] = {}
    for i, merge in enumerate(model.get("merges") or []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(a + b, i)
    n = len(model.get("merges") or [])
    scores = [float(-rank[t]) if t in rank else float(-n - i) for i, t in enumerate(texts)]  # no merge makes it: last
    for i, t in enumerate(texts):
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types[i] = int(gguf.TokenType.BYTE)
        elif t == model.get("unk_token"):
            types[i] = int(gguf.TokenType.UNKNOWN)
    # "▁" before the first word: a Prepend normalizer (Llama 2 style) or a Metaspace that prepends
    normalizer, pre = json.dumps(tok.get("normalizer")), json.dumps(tok.get("pre_tokenizer"))
    prefix = '"Prepend"' in normalizer or ('"Metaspace"' in pre and '"prepend_scheme": "never"' not in pre)
    return Vocab("llama", "default", texts, types, scores, prefix)


def _pre_name(pre: dict[str, Any]) -> str:
    """llama.cpp's name for the split a byte-level pre-tokenizer does ("default" where none fits)."""
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in PRE_NAMES:
        return PRE_NAMES[splits[0]]
    kinds = [p.get("type") for p in parts]
    if not splits and kinds[-1:] == ["ByteLevel"] and parts[-1].get("use_regex", True):
        if kinds == ["ByteLevel"]:
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"  # each digit alone, then GPT-2's split: llama.cpp's name for it
    return "default"


def export_gguf(run: str | Path, out: str | Path, outtype: str = "f16", adapter: str | None = None,
                overwrite: bool = False, progress: Progress | None = None) -> GgufExport:
    """Merge the run's adapter (``adapter``: best, final or a folder) into its base and write the
    GGUF file ``out`` with weights in ``outtype`` (f16, q8_0 or f32; norms and biases stay f32).
    ``progress(done, total)``: bytes of the merge, then bytes of the GGUF written."""
    from mlxtune.models.source import model_config, resolve_model

    run, out = Path(run), Path(out)
    if outtype not in OUTTYPES:
        raise MlxtuneError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    if out.is_dir():
        raise MlxtuneError(f"{out}: is a folder; --format gguf writes one file, e.g. {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise MlxtuneError(f"{out}: already exists; choose another output name or pass --overwrite")
    recipe = run_recipe(run)
    refuse_virtual(recipe, adapter_folder(run, adapter))
    model_dir = Path(resolve_model(recipe.model.path, recipe.model.revision, recipe.model.trust_remote_code))
    config = model_config(model_dir)
    arch, permute = check_arch(config, model_dir / "config.json")  # refused before any work
    vocab = read_vocab(model_dir, int(config["vocab_size"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        merged = export_merged(run, work / "merged", "float32", adapter, progress=progress)
        result = GgufExport(out, merged.adapter, merged.method, arch, outtype, notes=merged.notes + vocab.notes)
        if config.get("sliding_window") and config.get("model_type") == "mistral":
            result.notes.append(f"sliding_window = {config['sliding_window']} is not stored (llama.cpp writes Mistral as "
                                "llama too): readers attend over the whole context, the same up to that many tokens")
        _write(work / "merged", tmp, config | {"_name_or_path": Path(recipe.model.path).name}, arch, permute, vocab, result,
               progress)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        tmp.unlink(missing_ok=True)
    return result


def _write(folder: Path, tmp: Path, config: dict[str, Any], arch: str, permute: bool,
           vocab: Vocab, result: GgufExport, progress: Progress | None) -> None:
    """The GGUF file: metadata, then each tensor converted one at a time (streamed, not all in memory)."""
    import gguf

    files = _weight_files(folder)
    headers = {f: st.read_header(f)[1] for f in files}
    plan = _plan(headers, config, arch, result.outtype)
    writer = gguf.GGUFWriter(str(tmp), arch)
    _metadata(writer, folder, config, arch, vocab, result.outtype)
    factors = llama3_rope_factors(config)
    if factors is not None:  # written first, so it is also the first tensor's data below
        writer.add_tensor_info(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, factors.dtype,
                               factors.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
    for name, (gname, shape, qtype) in plan.items():
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype) if qtype == gguf.GGMLQuantizationType.Q8_0 else shape
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8)
        nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(gname, byte_shape, np.dtype(dtype), nbytes, raw_dtype=qtype)
        result.bytes += nbytes
        result.types[qtype.name] = result.types.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if factors is not None:
        writer.write_tensor_data(factors)
        result.tensors += 1
    done = 0
    heads, kv_heads = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or config["num_attention_heads"])
    for f in files:
        for name, arr in st.iter_tensors(f, [n for n in headers[f] if n in plan]):
            gname, _, qtype = plan[name]
            arr = np.asarray(arr, dtype=np.float32)
            if permute and gname.endswith(("attn_q.weight", "attn_k.weight")):
                arr = _permute(arr, heads, heads if "attn_q" in gname else kv_heads)
            data = (gguf.quants.quantize(arr, qtype) if qtype == gguf.GGMLQuantizationType.Q8_0
                    else arr.astype(np.float16 if qtype == gguf.GGMLQuantizationType.F16 else np.float32))
            writer.write_tensor_data(np.ascontiguousarray(data))
            result.tensors += 1
            done += data.nbytes
            if progress:
                progress(done, result.bytes)
    writer.close()


def _permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows from halves (HF rope) to interleaved pairs."""
    n = n_head_kv if n_head_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan(headers: dict[Path, dict[str, Any]], config: dict[str, Any], arch: str, outtype: str) -> dict[str, tuple[str, list[int], Any]]:
    """HF tensor name -> (GGUF name, shape, GGML type) for every tensor written, in file order.
    As llama.cpp: 1-D tensors (norms, biases) f32; matrices in ``outtype`` (q8_0 where rows split
    into blocks of 32, else f16); the lm_head is left out when the embeddings are tied."""
    import gguf

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, int(config["num_hidden_layers"]))
    tied = bool(config.get("tie_word_embeddings", False))
    matrix = {"f16": gguf.GGMLQuantizationType.F16, "f32": gguf.GGMLQuantizationType.F32,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    plan = {}
    for f, header in headers.items():
        for name, info in header.items():
            if name == "__metadata__" or name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue
            gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise MlxtuneError(f"{f}: tensor {name} has no GGUF name for arch {arch}; use --format merged and "
                                   "llama.cpp's convert_hf_to_gguf.py")
            shape = list(info["shape"])
            qtype = matrix if len(shape) == 2 else gguf.GGMLQuantizationType.F32
            if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
                qtype = gguf.GGMLQuantizationType.F16
            plan[name] = (gname, shape, qtype)
    return plan


def _metadata(writer: Any, folder: Path, config: dict[str, Any], arch: str,
              vocab: Vocab, outtype: str) -> None:
    """The model's hyper-parameters under llama.cpp's keys, and the tokenizer (tokens, types,
    merges, special ids, add_bos, chat template: gguf.SpecialVocab reads them from the folder)."""
    import gguf

    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    # not the bare name "mistral": transformers' reader would then look for a "mistral" arch that gguf-py lacks and
    # fail; as a llama file it loads as LlamaForCausalLM, the same computation (llama.cpp writes Mistral as llama too)
    writer.add_name(str(config.get("_name_or_path") or arch))
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    writer.add_context_length(int(config.get("max_position_embeddings") or 4096))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(vocab.tokens))
    special.add_special_token.update(_adds_bos_eos(folder))
    special.add_to_gguf(writer, quiet=True)


def _adds_bos_eos(folder: Path) -> dict[str, bool]:
    """Whether the tokenizer the run trained with adds BOS / EOS to a text, asked of the tokenizer
    itself: readers otherwise guess (transformers and llama.cpp add BOS for a "llama" vocabulary)."""
    from mlxtune.models.source import load_tokenizer

    tok = load_tokenizer(folder)
    ids = tok("hello")["input_ids"]
    return {"bos": tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id],
            "eos": tok.eos_token_id is not None and ids[-1:] == [tok.eos_token_id]}
