"""`mlxtune export RUN OUT --format gguf` (issue 14): a LoRA run's merged model as one GGUF file,
read back by stock transformers (``from_pretrained(dir, gguf_file=name)``, its own GGUF reader,
which un-permutes llama's q/k rows) gives the merged fp32 model's logits and greedy text, and the
same tokenizer ids and chat template. Tiny random models (2 blocks, fp32): Llama (rope theta
50000; byte-level BPE, BOS added, GPT-2 split), Mistral (sentencepiece BPE with byte fallback;
written as llama.cpp does, the llama arch, so it reads back as a Llama), Qwen2 (q/k/v biases,
tied embeddings, Qwen2 split) and Qwen3 (q/k norms, head_dim 128). ``pytest -rP`` shows the numbers."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from conftest import CHAT_TEMPLATE, TINY_RECORDS, WORDS  # noqa: E402
from mlxtune.cli.main import cli  # noqa: E402
from mlxtune.export.gguf import export_gguf  # noqa: E402
from test_export import train  # noqa: E402

F16_TOL = 1e-3
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
Q8_TOL = 2e-2  # measured on these tiny models: 9.7e-3 llama, 5.1e-3 mistral, 3.5e-3 qwen2, 2.9e-3 qwen3 (f16: <= 2.6e-4)
TEXT = "say hello world, the sky is blue! count to 3 (café)"
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def build_bpe_tokenizer(path, qwen_split, bos):
    """A byte-level BPE tokenizer (~300 tokens) trained on the tiny corpus, with a chat template;
    ``qwen_split``: Qwen2's split regex, else GPT-2's; ``bos``: BOS added to every text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    if qwen_split:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 3 + [f"{r['prompt']} {r['completion']}" for r in TINY_RECORDS]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=330, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=specials[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_spm_tokenizer(path):
    """A sentencepiece-style BPE tokenizer with byte fallback (as Llama 2 / Mistral v0.3 ship it:
    transformers' LlamaTokenizer, <unk> <s> </s>, then <0x00>..<0xFF>), trained on the tiny corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = [" ".join(WORDS)] * 3 + [f"{r['prompt']} {r['completion']}" for r in TINY_RECORDS]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, show_progress=False))
    trained = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(t, len(vocab))
    fast = LlamaTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]], unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>", pad_token="<pad>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(path, arch, vocab_size, seed=0):
    import torch
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        cfg = LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
        model = LlamaForCausalLM(cfg)
    elif arch == "llama3":  # Llama 3.2's rope (head_dim 16: kept, ramped and divided frequencies all occur)
        cfg = LlamaConfig(**common, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)
        model = LlamaForCausalLM(cfg)
    elif arch == "mistral":  # written as llama.cpp does: the llama arch, named "mistral"
        cfg = MistralConfig(**common, tie_word_embeddings=False, sliding_window=None,
                            rope_parameters={"rope_type": "default", "rope_theta": 20000.0})
        model = MistralForCausalLM(cfg)
    elif arch == "qwen3":  # q/k norms, no biases; head_dim 128 as in every Qwen3 (the GGUF reader assumes it)
        cfg = Qwen3Config(**common, head_dim=128, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        model = Qwen3ForCausalLM(cfg)
    else:
        cfg = Qwen2Config(**common, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # random biases (zero at init) so the test sees whether they are written
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            if arch == "llama3" and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)  # sharp attention, so the rope's frequencies show in the logits
    model.save_pretrained(path)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def tiny_bpe_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tiny_{request.param}_bpe")
    if request.param == "mistral":  # Mistral's own kind of tokenizer: sentencepiece BPE with byte fallback
        tok = build_spm_tokenizer(path)
    else:
        tok = build_bpe_tokenizer(path, qwen_split=request.param.startswith("qwen"), bos=request.param == "llama")
    build_model(path, request.param, len(tok))
    return request.param, path


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _load(folder, gguf_file=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), **kw)


def _greedy(model, tok, n=16):
    import torch

    ids = tok.apply_chat_template([{"role": "user", "content": "say hello"}], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_gguf_round_trip_in_transformers(tiny_bpe_model, tiny_recipe, tmp_path):
    from mlxtune.export.merge import export_merged

    arch, model_dir = tiny_bpe_model
    _, run = train(tiny_recipe, "torch", "lora", extra=(f"model.path={model_dir}",))
    ref_model, ref_tok = _load(export_merged(run, tmp_path / "merged", "float32").path)
    ids = ref_tok(TEXT)["input_ids"]
    ref = _logits(ref_model, ids)
    base = _logits(_load(model_dir)[0], ids)
    moved = float(np.abs(ref - base).max())
    assert moved > 1e-2, "the trained adapter should change the logits, else this test proves nothing"
    line = [f"{arch}: adapter moved logits by {moved:.2e}"]
    for outtype, tol in (("f16", F16_TOL), ("q8_0", Q8_TOL)):
        res = export_gguf(run, tmp_path / f"model-{outtype}.gguf", outtype)
        assert res.arch == {"mistral": "llama"}.get(arch, arch) and res.path.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
        model, tok = _load(tmp_path, res.path.name)
        assert model.config.model_type == {"mistral": "llama"}.get(arch, arch)  # as llama.cpp, mistral is llama
        assert tok(TEXT)["input_ids"] == ids and tok.chat_template == CHAT_TEMPLATE
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
        assert tok.convert_tokens_to_ids("<|assistant|>") == ref_tok.convert_tokens_to_ids("<|assistant|>")
        d = float(np.abs(_logits(model, ids) - ref).max())
        got, want = _greedy(model, tok), _greedy(ref_model, ref_tok)
        same = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), len(want))
        line.append(f"{outtype} {res.types}: max |logit diff| {d:.2e}, greedy tokens equal: {same}/{len(want)}")
        # a random tiny model's top logits lie close together: q8_0 may flip a greedy pick, f16 must not
        assert d <= tol and (outtype != "f16" or got == want)
        if outtype == "f16":
            f16 = d
    print("; ".join(line))
    assert f16 < 1e-2 * moved


def test_gguf_llama_rows_are_permuted_for_llama_cpp(tiny_bpe_model, tiny_recipe, tmp_path):
    """The file holds q/k rows as llama.cpp wants them (llama: permuted; qwen2: as they are), so
    the round trip above is not two mistakes cancelling out; and the written names and types."""
    from mlxtune.models import safetensors_io as st

    arch, model_dir = tiny_bpe_model
    _, run = train(tiny_recipe, "torch", "lora", steps=1, extra=(f"model.path={model_dir}",))
    cmd = ["export", str(run), str(tmp_path / "m.gguf"), "--format", "gguf", "--outtype", "f32"]
    res = CliRunner().invoke(cli, cmd)
    assert res.exit_code == 0 and "m.gguf: lora adapter" in res.output and "GGUF" in res.output, res.output
    res = CliRunner().invoke(cli, cmd)
    assert res.exit_code == 2 and "already exists" in res.output and "--overwrite" in res.output
    assert CliRunner().invoke(cli, cmd + ["--overwrite"]).exit_code == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (arch in ("llama", "mistral"))  # the qwens' embeddings are tied
    assert ("blk.0.attn_q_norm.weight" in tensors) == (arch == "qwen3")
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    from mlxtune.export.merge import export_merged

    merged = st.read_tensors(export_merged(run, tmp_path / "merged", "float32").path / "model.safetensors",
                             ["model.layers.0.self_attn.k_proj.weight"])["model.layers.0.self_attn.k_proj.weight"]
    k = np.array(tensors["blk.0.attn_k.weight"].data).reshape(merged.shape)
    assert np.array_equal(k, merged) == arch.startswith("qwen")
    assert np.array_equal(np.sort(k, axis=None), np.sort(merged, axis=None))  # the same values, rows moved
    meta = {f.name: f for f in reader.fields.values()}
    assert f"{ {'mistral': 'llama'}.get(arch, arch)}.rope.freq_base" in meta and "tokenizer.chat_template" in meta and "tokenizer.ggml.merges" in meta


def llama_cpp_spm_ids(reader, text):
    """llama.cpp's "llama" (sentencepiece) tokenizer on ``text``, from the GGUF's tokens and scores:
    UTF-8 characters merged pairwise, highest score first (leftmost on ties), then byte fallback."""
    field = lambda k: reader.fields[k]  # noqa: E731
    tokens = [bytes(field("tokenizer.ggml.tokens").parts[i]).decode() for i in field("tokenizer.ggml.tokens").data]
    scores = [float(field("tokenizer.ggml.scores").parts[i][0]) for i in field("tokenizer.ggml.scores").data]
    ids = {t: i for i, t in enumerate(tokens)}
    prefix = bool(field("tokenizer.ggml.add_space_prefix").parts[-1][0])
    syms = list(("\u2581" if prefix else "") + text.replace(" ", "\u2581"))
    while True:
        pairs = [(-scores[ids[a + b]], i) for i, (a, b) in enumerate(zip(syms, syms[1:])) if a + b in ids]
        if not pairs:
            break
        _, i = min(pairs)
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    return [ids[s] if s in ids else ids[f"<0x{b:02X}>"] for s in syms for b in ([0] if s in ids else s.encode())]


def test_gguf_sentencepiece_scores_give_llama_cpp_the_same_ids(tmp_path, tiny_recipe):
    """The scores written for a BPE-with-byte-fallback vocabulary (minus the merge rank) make
    llama.cpp's sentencepiece tokenizer (re-implemented above) produce the HF tokenizer's ids."""
    path = tmp_path / "spm"
    tok = build_spm_tokenizer(path)
    build_model(path, "mistral", len(tok))
    _, run = train(tiny_recipe, "torch", "lora", steps=1, extra=(f"model.path={path}",))
    export_gguf(run, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    for text in (TEXT, "hello café: the dog is big, count seven eight", "translate english to turkish"):
        want = tok(text, add_special_tokens=False)["input_ids"]
        assert llama_cpp_spm_ids(reader, text) == want, text
    assert len(set(want)) > 3 and any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in tok("café")["input_ids"])


def test_gguf_refuses_unsupported_architecture_and_tokenizer_before_work(tiny_recipe, tiny_model_dir, tmp_path):
    """Refused by name, in one line, before anything is merged or written."""
    import shutil

    _, run = train(tiny_recipe, "torch", "lora", steps=1)
    cmd = ["export", str(run), str(tmp_path / "m.gguf"), "--format", "gguf"]
    # conftest's tiny word-level tokenizer has no GGUF form
    res = CliRunner().invoke(cli, cmd)
    assert res.exit_code == 2, res.output
    assert "tokenizer.json: a WordLevel tokenizer is not written to GGUF here" in res.output
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt_neox"}))
    recipe = run / "recipe.resolved.toml"
    recipe.write_text(recipe.read_text().replace(str(tiny_model_dir), str(other)))
    res = CliRunner().invoke(cli, cmd + ["--outtype", "q8_0"])
    assert res.exit_code == 2, res.output
    assert "model_type 'gpt_neox' cannot be exported to GGUF here; supported: llama, mistral, qwen2, qwen3" in res.output
    assert not (tmp_path / "m.gguf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_gguf_in_llama_cpp(tiny_bpe_model, tiny_recipe, tmp_path):
    """The consumer the format is for: llama.cpp itself (llama-cpp-python, a source build, so only where it
    is installed) reads the f16 file, tokenizes like the model's tokenizer, and computes the merged
    model's logits and greedy text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mlxtune.export.merge import export_merged

    arch, model_dir = tiny_bpe_model
    _, run = train(tiny_recipe, "torch", "lora", extra=(f"model.path={model_dir}",))
    ref_model, ref_tok = _load(export_merged(run, tmp_path / "merged", "float32").path)
    res = export_gguf(run, tmp_path / "model-f16.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(res.path), n_ctx=128, logits_all=True, verbose=False, seed=0)
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    ids = ref_tok(TEXT)["input_ids"]
    assert llm.tokenize(TEXT.encode(), add_bos=ids[0] == ref_tok.bos_token_id, special=True) == ids
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    d = float(np.abs(got - _logits(ref_model, ids)).max())
    prompt = ref_tok.apply_chat_template([{"role": "user", "content": "say hello"}], add_generation_prompt=True, return_dict=False)
    llm.reset()
    greedy = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):  # llama.cpp's generate goes on past eos
        greedy.append(int(tok))
        if len(greedy) == 16:
            break
    want = list(prompt)
    for _ in range(16):  # plain argmax, eos included (transformers' generate would stop or suppress it)
        want.append(int(_logits(ref_model, want)[-1].argmax()))
    want = want[len(prompt):]
    same = next((i for i, (a, b) in enumerate(zip(greedy, want)) if a != b), len(want))
    q8 = llama_cpp.Llama(model_path=str(export_gguf(run, tmp_path / "model-q8_0.gguf", "q8_0").path), n_ctx=128,
                         logits_all=True, verbose=False)
    q8.eval(ids)
    d8 = float(np.abs(np.asarray(q8.scores[: len(ids)], dtype=np.float32) - _logits(ref_model, ids)).max())
    print(f"{arch}: llama.cpp f16 max |logit diff| {d:.2e}, greedy tokens equal {same}/{len(want)}; q8_0 {d8:.2e}")
    assert d <= F16_TOL and greedy == want and d8 <= Q8_TOL


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama3_rope")
    build_model(path, "llama3", len(build_bpe_tokenizer(path, qwen_split=False, bos=True)))
    return path


def test_gguf_llama3_rope_round_trip(tiny_llama3, tiny_recipe, tmp_path, monkeypatch):
    """Llama 3.1/3.2's rope goes into the GGUF as llama.cpp's rope_freqs tensor (equal to transformers' own
    llama3 frequencies), and that GGUF used as a base model reads back with that rope, where transformers'
    GGUF reader alone silently falls back to the default rope."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mlxtune.export.merge import export_merged
    from mlxtune.models.source import resolve_model

    _, run = train(tiny_recipe, "torch", "lora", extra=(f"model.path={tiny_llama3}",))
    res = export_gguf(run, tmp_path / "m.gguf", "f32")
    freqs = next(np.asarray(t.data) for t in gguf.GGUFReader(str(res.path)).tensors if t.name == "rope_freqs.weight")
    inv_llama3, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(tiny_llama3), "cpu")
    inv_default = 1 / (500000.0 ** (np.arange(0, 16, 2) / 16))
    np.testing.assert_allclose(inv_default / freqs, inv_llama3.numpy(), rtol=1e-5)
    assert freqs.min() == 1 and freqs.max() == 32 and len(set(freqs.tolist())) > 2

    ref_model, ref_tok = _load(export_merged(run, tmp_path / "merged", "float32").path)
    ids = ref_tok(" ".join([TEXT] * 8))["input_ids"]  # long: the rope turns the slow frequencies far enough to matter
    ref = _logits(ref_model, ids)
    monkeypatch.setenv("MLXTUNE_CACHE", str(tmp_path / "cache"))
    folder = resolve_model(str(res.path))
    assert json.loads((folder / "config.json").read_text())["rope_parameters"] == LLAMA3_ROPE
    d = float(np.abs(_logits(_load(folder)[0], ids) - ref).max())
    plain = float(np.abs(_logits(_load(tmp_path, res.path.name)[0], ids) - ref).max())  # transformers' reader alone
    print(f"llama3 rope: GGUF as base {d:.2e}; transformers' GGUF reader alone (default rope) {plain:.2e}")
    assert d <= 1e-4 and plain > 1e-2


@pytest.mark.slow
def test_gguf_llama3_rope_in_llama_cpp(tiny_llama3, tiny_recipe, tmp_path):
    """llama.cpp applies the rope_freqs written for Llama 3's rope: its logits are the merged model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mlxtune.export.merge import export_merged

    _, run = train(tiny_recipe, "torch", "lora", extra=(f"model.path={tiny_llama3}",))
    ref_model, ref_tok = _load(export_merged(run, tmp_path / "merged", "float32").path)
    llm = llama_cpp.Llama(model_path=str(export_gguf(run, tmp_path / "m.gguf", "f16").path), n_ctx=512, logits_all=True,
                          verbose=False)
    ids = ref_tok(" ".join([TEXT] * 8))["input_ids"]  # long: the rope turns the slow frequencies far enough to matter
    llm.eval(ids)
    d = float(np.abs(np.asarray(llm.scores[: len(ids)], dtype=np.float32) - _logits(ref_model, ids)).max())
    print(f"llama3 rope: llama.cpp f16 max |logit diff| {d:.2e}")
    assert d <= F16_TOL
