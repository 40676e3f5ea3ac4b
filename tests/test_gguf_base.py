"""A GGUF file as the base model (models/gguf_base.py, models/source.py): converted once into the
cache and reused, refused in one line when it is no GGUF or an architecture transformers cannot read;
a folder that keeps `quantization_config: {quant_method: gguf}` over float weights trains on both backends."""

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from mlxtune.cli.main import cli
from mlxtune.errors import MlxtuneError
from mlxtune.models import gguf_base
from mlxtune.models import source as models

STEPS = ("--set", "train.steps=2", "--set", "train.eval_every=2", "--set", "train.warmup_steps=0", "--no-progress")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_gguf(path, arch, file_type=None):
    """A GGUF file with metadata only (no tensors): enough for every check before a conversion."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    if file_type is not None:
        w.add_file_type(file_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_tiny_llama_gguf(path, model_dir):
    """The tiny Llama of conftest as llama.cpp would store it: Q8_0 matrices, a character-level
    llama tokenizer (the tiny model's vocabulary size) and a chat template."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from mlxtune.models.safetensors_io import read_float32

    weights = read_float32(model_dir / "model.safetensors")
    cfg = json.loads((model_dir / "config.json").read_text())
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_context_length(512)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(33, 127)] + ["\u2581"]
    assert len(tokens) <= cfg["vocab_size"]
    tokens += [f"<extra{i}>" for i in range(cfg["vocab_size"] - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}</s>{% endfor %}"
                        "{% if add_generation_prompt %}<assistant> {% endif %}")
    block = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    for name, value in weights.items():
        parts = name.split(".")
        gname = top.get(name) or f"blk.{parts[2]}.{block['.'.join(parts[3:-1])]}.weight"
        value = np.ascontiguousarray(value, dtype=np.float32)
        if value.ndim == 2:
            q = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def short_records(recipe):
    """8 short records (6 train / 2 eval) in the recipe's train.jsonl: they fit any tokenizer in 64 tokens."""
    records = [{"prompt": f"say {w}", "completion": w} for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")]
    (recipe.parent / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def run_events(recipe, name):
    events = [json.loads(line) for line in (recipe.parent / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [e["step"] for e in events if e["event"] == "train"], [e["step"] for e in events if e["event"] == "eval"]


def one_error_line(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.output
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


# ---- refusals, before anything heavy -------------------------------------------------------------

def test_missing_and_not_gguf_files_are_one_line_errors(tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    missing = tmp_path / "gone.Q4_K_M.gguf"
    one_error_line(invoke("run", recipe, "--set", f"model.path={missing}"), str(missing), "no such GGUF file")
    bad = tmp_path / "notes.gguf"
    bad.write_text("not a gguf at all\n" * 4)
    line = one_error_line(invoke("run", recipe, "--set", f"model.path={bad}"), str(bad), "is not a GGUF file")
    assert "Hugging Face-format folder" in line
    one_error_line(invoke("plan", recipe, "--set", f"model.path={bad}"), "is not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(MlxtuneError, match="empty.gguf is not a GGUF file"):
        models.resolve_model(str(empty))


def test_unsupported_architecture_is_refused_with_the_readable_list(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny-rwkv.gguf", "rwkv7")
    with pytest.raises(MlxtuneError) as e:
        models.resolve_model(str(path))
    msg = str(e.value)
    assert "'rwkv7' cannot be read by transformers" in msg and "\n" not in msg
    readable = msg.split("(it reads: ", 1)[1].split(")", 1)[0].split(", ")
    assert {"llama", "qwen2", "qwen3", "gemma2", "phi3"} <= set(readable) and "rwkv7" not in readable
    assert "t5" not in readable and "general" not in readable and "tokenizer" not in readable
    with pytest.raises(MlxtuneError, match="'rwkv7' cannot be read"):  # plan refuses it the same way
        models.gguf_config(str(path))
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


# ---- conversion once, reuse, re-conversion when the file changes ---------------------------------

def test_conversion_runs_once_and_again_when_the_file_changes(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """The cache logic with the de-quantization itself replaced by a copy of the tiny model (the real
    one runs in the slow test below): one conversion, reused, redone in place when the file changes."""
    gguf = pytest.importorskip("gguf")
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(path, out, fix_config, template_fix=None):
        calls.append(path)
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, out / f.name)

    monkeypatch.setattr(gguf_base, "convert", fake_convert)
    path = write_gguf(tmp_path / "tiny.Q4_K_M.gguf", "llama", gguf.LlamaFileType.MOSTLY_Q4_K_M)
    first = models.resolve_model(str(path))
    assert first.parent == tmp_path / "cache" / "gguf" and first.name.startswith("tiny.Q4_K_M-")
    assert len(calls) == 1 and calls[0] == path.resolve()
    err = capsys.readouterr().err
    assert "converting tiny.Q4_K_M.gguf to safetensors (once)" in err
    assert "the weights are the de-quantized GGUF's (Q4_K_M -> float32), not the original checkpoint's" in err
    marker = json.loads((first / "mlxtune-source.json").read_text())
    assert marker["gguf"] == str(path.resolve()) and marker["architecture"] == "llama"
    assert "de-quantized GGUF's (Q4_K_M -> float32)" in marker["note"] == models.source_note(first)
    assert not list(first.parent.glob(".*.tmp"))

    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model(str(tmp_path / "." / path.name)) == first  # another spelling, same file
    assert len(calls) == 1 and "converting" not in capsys.readouterr().err
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    config, where = models.gguf_config(str(path))  # plan reads the converted folder's config
    assert where == str(first / "config.json") and config["hidden_size"] == 64

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed: convert again, in place
    assert models.resolve_model(str(path)) == first and len(calls) == 2
    assert json.loads((first / "mlxtune-source.json").read_text())["gguf_mtime_ns"] == st.st_mtime_ns + 10**9
    assert [p.name for p in first.parent.iterdir()] == [first.name]


def test_embedded_alias_keeps_its_cache_folder_and_marker(tmp_path, monkeypatch):
    """A cache written before this change (marker without a note) is still a finished conversion."""
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path))
    gguf = models._embedded_gguf()
    target = tmp_path / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    old = {"format": 1, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
    (target / "mlxtune-source.json").write_text(json.dumps(old))
    monkeypatch.setattr(gguf_base, "convert", lambda *a, **k: pytest.fail("re-converted a valid cache"))
    assert models.resolve_model("embedded:smollm2") == target
    assert gguf_base.is_converted(target, old) and not gguf_base.is_converted(target, old | {"gguf_bytes": 1})


# ---- a folder with quantization_config {quant_method: gguf} over float weights -------------------

def gguf_marked_copy(tiny_model_dir, tmp_path):
    folder = tmp_path / "from-gguf"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_gguf_marked_float_folder_trains(backend, tiny_recipe, tiny_model_dir, tmp_path):
    pytest.importorskip(backend)
    folder = gguf_marked_copy(tiny_model_dir, tmp_path)
    recipe = tiny_recipe()
    res = invoke("run", recipe, "--backend", backend, "--set", f"model.path={folder}", "--set", f"output.name={backend}", *STEPS)
    assert res.exit_code == 0, res.output
    assert run_events(recipe, backend) == ([1, 2], [0, 2])
    # and its adapter merges like any float model's (the exported config drops the stale quantization_config)
    out = tmp_path / "merged"
    res = invoke("export", recipe.parent / "runs" / backend, out, "--format", "merged")
    assert res.exit_code == 0, res.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_gguf_marked_folder_with_packed_weights_is_still_refused_by_mlx(tiny_model_dir, tmp_path):
    pytest.importorskip("mlx")
    from backends.mlx_config import mlx_model_config
    from mlxtune.models.safetensors_io import write_file

    folder = gguf_marked_copy(tiny_model_dir, tmp_path)
    assert gguf_base.float_weights(folder)
    mlx_model_config(folder)  # float weights: an unquantized model
    write_file(folder / "model-extra.safetensors", [("blocks", "U8", (4,), bytes(4))])
    assert not gguf_base.float_weights(folder)
    with pytest.raises(MlxtuneError, match="a gguf-quantized checkpoint cannot be trained by the mlx backend"):
        mlx_model_config(folder)


# ---- a GGUF file converted for real: the tiny Llama (fast), the embedded model's own file (slow) ------

@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.Q8_0.gguf", tiny_model_dir)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_tiny_gguf_file_trains_and_evaluates(backend, tiny_gguf, tiny_model_dir, tiny_recipe, monkeypatch):
    pytest.importorskip(backend)
    from mlxtune.models.safetensors_io import read_float32

    cache = tiny_gguf.parent / "cache"  # shared by both backends: the first converts, the second reuses
    monkeypatch.setenv("MLXTUNE_CACHE", str(cache))
    recipe = tiny_recipe()
    short_records(recipe)
    fresh = not cache.exists()
    if fresh:  # plan reads the GGUF header before any conversion
        res = invoke("plan", recipe, "--set", f"model.path={tiny_gguf}")
        assert res.exit_code == 0 and "(its GGUF header)" in res.output, res.output
    res = invoke("run", recipe, "--backend", backend, "--set", f"model.path={tiny_gguf}", "--set", f"output.name={backend}", *STEPS)
    assert res.exit_code == 0, res.output
    assert ("converting tiny-llama.Q8_0.gguf to safetensors (once): the weights are the de-quantized GGUF's "
            "(Q8_0 -> float32), not the original checkpoint's") in res.output or not fresh
    assert run_events(recipe, backend) == ([1, 2], [0, 2])
    # every run on it says so, not only the one that converted
    assert "note: the weights are the de-quantized GGUF's (Q8_0 -> float32), not the original checkpoint's" in " ".join(res.output.split())

    folder = models.resolve_model(str(tiny_gguf))
    assert [p.name for p in (cache / "gguf").iterdir()] == [folder.name]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model(str(tiny_gguf)) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    got, want = read_float32(folder / "model.safetensors"), read_float32(tiny_model_dir / "model.safetensors")
    # de-quantized Q8_0: within a step of 8-bit blocks of the original (q/k rows are permuted by llama.cpp's layout)
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        assert got[name].dtype.name == "float32" and 0 < abs(got[name] - want[name]).max() < 2e-3, name


# ---- the embedded model's own GGUF file, converted for real --------------------------------------

@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_cache")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_embedded_gguf_file_trains_and_evaluates(backend, gguf_cache, tiny_recipe, monkeypatch):
    pytest.importorskip(backend)
    monkeypatch.setenv("MLXTUNE_CACHE", str(gguf_cache))
    gguf = models._embedded_gguf()
    recipe = tiny_recipe()
    short_records(recipe)
    fresh = not (gguf_cache / "gguf").exists()  # the first of the two converts
    if fresh:  # plan reads the GGUF header before any conversion
        res = invoke("plan", recipe, "--set", f"model.path={gguf}")
        assert res.exit_code == 0 and "(its GGUF header)" in res.output, res.output
    res = invoke("run", recipe, "--backend", backend, "--set", f"model.path={gguf}", "--set", "train.micro_batch=2", "--set", "train.grad_accum=1", "--set", f"output.name={backend}", *STEPS)
    assert res.exit_code == 0, res.output
    assert ("to safetensors (once)" in res.output) == fresh  # converted once, by the first
    assert "de-quantized GGUF's (Q4_1 -> float32)" in " ".join(res.output.split())  # and every run says whose weights
    assert run_events(recipe, backend) == ([1, 2], [0, 2])

    folder = models.resolve_model(str(gguf))  # the second resolve reuses the folder
    assert folder.parent == gguf_cache / "gguf" and [p.name for p in folder.parent.iterdir()] == [folder.name]
    marker = json.loads((folder / "mlxtune-source.json").read_text())
    assert marker["gguf_quantization"] == "Q4_1" and "quantization_config" not in json.loads((folder / "config.json").read_text())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model(str(gguf)) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_rope_freqs_read_as_llama3_rope_or_refused(tmp_path):
    """llama.cpp stores Llama 3's rope as a rope_freqs tensor that transformers' GGUF reader ignores: mlxtune
    reads it back as the llama3 rope it stands for, and refuses rope_freqs that are no Llama 3 rope."""
    import gguf

    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"rope_theta": 500000.0}}
    want = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, **gguf_base.LLAMA3_ROPE}

    def write(name, freqs):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        w.add_tensor("rope_freqs.weight", freqs)
        w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
        return tmp_path / name

    freqs = gguf_base.llama3_rope_factors(config | {"rope_parameters": want})
    assert gguf_base.rope_from_freqs(write("llama3.gguf", freqs), config) == want
    for name, bad, cfg in (("ramp.gguf", freqs * 1.5, config), ("qwen.gguf", freqs, config | {"model_type": "qwen2"})):
        with pytest.raises(MlxtuneError, match="rope_freqs tensor is not Llama 3's rope"):
            gguf_base.rope_from_freqs(write(name, bad), cfg)
