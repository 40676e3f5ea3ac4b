"""Batched generation: the numpy decode loop and sampler, ``generate_texts``, and both
backends' ``generate`` on the tiny fp32 Llama (padding invisible, eos / should_stop /
max_tokens, seeded sampling, adapter off, torch == MLX token for token), plus one greedy run of
the embedded SmolLM2 on a real chat-template prompt."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.evaluation.generation import (
    GenSettings,
    chunk_seed,
    cut_at_stop,
    decode_loop,
    eos_token_ids,
    generate_texts,
    left_pad,
    sample_next,
)

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORK = {"torch": "peft", "mlx": "mlx_lm"}


# ---------------------------------------------------------------- numpy core


def test_left_pad_and_bad_prompts():
    ids, pad = left_pad([np.array([5, 6, 7]), np.array([9], dtype=np.int64)], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]] and ids.dtype == np.int32 and pad.tolist() == [0, 2]
    with pytest.raises(ValueError, match="prompt 1"):
        left_pad([np.array([1]), np.array([], dtype=np.int32)], 0)
    with pytest.raises(ValueError, match="prompt 0"):
        left_pad([np.array([[1, 2]])], 0)


def test_sampler_greedy_nucleus_and_distribution():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)[None].astype(np.float32)
    assert sample_next(np.array([[0.0, 3.0, 3.0, 1.0]]), 0.0, 1.0, []).tolist() == [1]  # first max wins
    n = 4000
    rngs = [np.random.default_rng([7, i]) for i in range(n)]
    full = np.bincount(sample_next(np.repeat(logits, n, 0), 1.0, 1.0, rngs), minlength=4) / n
    assert np.allclose(full, probs, atol=0.03), full
    rngs = [np.random.default_rng([7, i]) for i in range(n)]
    nucleus = np.bincount(sample_next(np.repeat(logits, n, 0), 1.0, 0.7, rngs), minlength=4) / n
    assert nucleus[2:].sum() == 0 and np.allclose(nucleus[:2], [0.625, 0.375], atol=0.03), nucleus
    # a nucleus wider than the first top-k guess (64) on a flat 1000-token vocabulary
    flat = np.zeros((1, 1000), dtype=np.float32)
    draws = {int(sample_next(flat, 1.0, 0.9, [np.random.default_rng(i)])[0]) for i in range(300)}
    assert len(draws) > 200
    # low temperature sharpens toward the argmax
    cold = sample_next(np.repeat(logits, 200, 0), 0.05, 1.0, [np.random.default_rng(i) for i in range(200)])
    assert (cold == 0).all()


class Scripted:
    """A fake model: row r of the original batch emits script[r] token by token; records each
    step's batch size and ``keep`` so the row filtering is visible."""

    def __init__(self, script: list[list[int]], vocab: int = 50):
        self.script, self.vocab, self.calls = script, vocab, []
        self.rows = list(range(len(script)))
        self.pos = 0

    def logits(self) -> np.ndarray:
        out = np.zeros((len(self.rows), self.vocab), dtype=np.float32)
        for i, r in enumerate(self.rows):
            out[i, self.script[r][self.pos]] = 10.0
        return out

    def step(self, tokens: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
        self.calls.append((len(tokens), None if keep is None else keep.tolist()))
        if keep is not None:
            self.rows = [self.rows[k] for k in keep]
        assert [self.script[r][self.pos] for r in self.rows] == tokens.tolist()  # fed back what was sampled
        self.pos += 1
        return self.logits()


def test_decode_loop_stops_rows_and_filters_the_batch():
    script = [[5, 6, 2, 9, 9, 9], [7, 7, 7, 7, 7, 7], [8, 3, 4, 4, 4, 4]]
    fake = Scripted(script)
    out = decode_loop(fake.logits(), fake.step, 5, eos_ids=[2], should_stop=lambda ids: ids[-2:] == [3, 4])
    assert out == [[5, 6], [7, 7, 7, 7, 7], [8, 3, 4]]  # eos dropped, should_stop's ids kept, max_tokens
    assert fake.calls == [(3, None), (3, None), (1, [1]), (1, None)]
    fake = Scripted(script)
    assert decode_loop(fake.logits(), fake.step, 0) == [[], [], []] and not fake.calls
    fake = Scripted([[2, 1]])
    assert decode_loop(fake.logits(), fake.step, 4, eos_ids=[2]) == [[]] and not fake.calls


def test_settings_and_helpers():
    bad = {"temperature": -1, "top_p": 0, "max_tokens": 0, "batch_size": 0, "stop": ("",), "seed": -3}
    for field, value in [*bad.items(), ("top_p", 1.5)]:
        with pytest.raises(MlxtuneError, match=field):
            GenSettings(**{field: value})
    assert GenSettings(stop=["###"]).stop == ("###",)
    assert cut_at_stop("a b ### c END d", ("END", "###")) == "a b " and cut_at_stop("abc", ("x",)) == "abc"
    assert chunk_seed(0, [3, 1]) == chunk_seed(0, [3, 1]) != chunk_seed(0, [1, 3]) != chunk_seed(1, [1, 3])


def test_eos_ids_include_the_end_of_turn_token(tiny_tokenizer, tiny_model_dir):
    assert eos_token_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]  # "</s>" ends a turn there
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)  # a copy whose template ends turns differently
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|system|> {% endfor %}"
    assert eos_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|system|>")]


class FakeBackend:
    """Answers each prompt with its own ids reversed, honouring max_tokens and should_stop."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, max_tokens, *, temperature=0.0, top_p=1.0, seed=0, eos_ids=(), pad_id=0,
                 adapter=True, should_stop=None):
        self.calls.append({"lengths": [len(p) for p in prompts], "seed": seed, "eos": list(eos_ids), "adapter": adapter})
        outs = []
        for p in prompts:
            ids = []
            for t in p[::-1].tolist()[:max_tokens]:
                ids.append(t)
                if should_stop is not None and should_stop(ids):
                    break
            outs.append(ids)
        return outs


def test_generate_texts_sorts_batches_restores_order_and_cuts_at_stop(tiny_tokenizer):
    tok = tiny_tokenizer
    sentences = ["red blue green cat", "one", "the sky is blue and the grass is green", "dog sun", "a cat"]
    prompts = [np.array(tok(s, add_special_tokens=False)["input_ids"], dtype=np.int32) for s in sentences]
    fake = FakeBackend()
    progress = RecordingProgress()
    texts = generate_texts(fake, tok, prompts, GenSettings(batch_size=2, stop=("is",)), adapter=False, progress=progress)
    assert [e[:2] for e in progress.events] == [("start", 5), ("advance", 2), ("advance", 2), ("advance", 1), ("close", None)]
    assert all(e[2].endswith(" prompts/s") for e in progress.events if e[0] == "advance")
    reversed_texts = [" ".join(s.split()[::-1]) for s in sentences]
    assert texts == [cut_at_stop(t, ("is",)) for t in reversed_texts]
    assert texts[2] == "green "  # "green is ..." cut at the stop string
    assert [c["lengths"] for c in fake.calls] == [[1, 2], [2, 4], [9]]  # shortest first, batches of 2
    assert all(c["eos"] == [tok.eos_token_id] and c["adapter"] is False for c in fake.calls)
    seeds = [c["seed"] for c in fake.calls]
    assert len(set(seeds)) == 3
    again = FakeBackend()
    assert generate_texts(again, tok, prompts, GenSettings(batch_size=2, stop=("is",))) == texts
    assert [c["seed"] for c in again.calls] == seeds
    assert generate_texts(FakeBackend(), tok, [], GenSettings()) == []


class RecordingProgress:
    """A generation Progress that remembers what it was told."""

    def __init__(self):
        self.events = []

    def start(self, total):
        self.events.append(("start", total, ""))

    def advance(self, n, rate_text):
        self.events.append(("advance", n, rate_text))

    def close(self):
        self.events.append(("close", None, ""))


def test_generate_texts_closes_its_progress_when_generation_fails(tiny_tokenizer):
    class Broken(FakeBackend):
        def generate(self, *a, **k):
            raise RuntimeError("boom")

    progress = RecordingProgress()
    prompt = np.array(tiny_tokenizer("one", add_special_tokens=False)["input_ids"], dtype=np.int32)
    with pytest.raises(RuntimeError, match="boom"):
        generate_texts(Broken(), tiny_tokenizer, [prompt], GenSettings(), progress=progress)
    assert [e[0] for e in progress.events] == ["start", "close"]


# ---------------------------------------------------------------- both backends on the tiny Llama


def tiny_backend(name: str, model_dir: Path, **train):
    from mlxtune.recipe.loading import recipe_from_dict
    from mlxtune.training.session import load_backend_with_adapter

    recipe = recipe_from_dict({
        "model": {"path": str(model_dir)},
        "data": {"train": "x.jsonl", "format": "chat"},
        # dropout > 0: generation must run in eval mode or nothing below would be deterministic
        "adapter": {"rank": 4, "alpha": 8.0, "dropout": 0.2},
        "train": {"seed": 3, **train},
    })
    backend = load_backend_with_adapter(name, model_dir, recipe)
    # lora_B = 0 at init leaves the model unchanged: make the adapter matter
    weights = backend.get_adapter_weights()
    for k in weights:
        if k.endswith("lora_B"):
            weights[k] = np.random.default_rng(zlib.crc32(k.encode())).normal(0, 0.3, weights[k].shape).astype(np.float32)
    backend.set_adapter_weights(dict(sorted(weights.items())))
    return backend


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    cache = {}

    def get(name: str):
        pytest.importorskip(FRAMEWORK[name])
        if name not in cache:
            cache[name] = tiny_backend(name, tiny_model_dir)
        return cache[name]

    return get


@pytest.fixture(params=["torch", "mlx"])
def backend(request, loaded):
    return loaded(request.param)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    """Chat-template prompts of different lengths (4 to 17 tokens), as the eval layer builds them."""
    from conftest import TINY_RECORDS
    from transformers import AutoTokenizer

    from mlxtune.data.records import encode_prompt
    from mlxtune.recipe.loading import recipe_from_dict

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = recipe_from_dict({"data": {"train": "x.jsonl", "format": "prompt_completion"}}).data
    out = [encode_prompt(r, cfg, tok) for r in TINY_RECORDS[:6] + TINY_RECORDS[9:]]
    out.append(np.array(tok("hello", add_special_tokens=False)["input_ids"], dtype=np.int32))
    assert len({len(p) for p in out}) >= 3
    return out


def first_index(ids: list[int], token: int) -> int:
    return ids.index(token) if token in ids else len(ids)


def test_batched_greedy_equals_one_by_one(backend, prompts):
    batched = backend.generate(prompts, 12)
    assert [len(o) for o in batched] == [12] * len(prompts)  # no eos given: max_tokens ends every row
    assert batched == [backend.generate([p], 12)[0] for p in prompts]
    assert len({tuple(o) for o in batched}) > 1
    assert backend.generate(prompts, 5) == [o[:5] for o in batched]


def test_eos_and_should_stop_end_rows_and_leave_the_others_alone(backend, prompts):
    full = backend.generate(prompts, 12)
    token = full[0][3]  # a token that ends row 0 after three others; other rows meet it elsewhere
    out = backend.generate(prompts, 12, eos_ids=[token, 10_000])
    assert out == [o[: first_index(o, token)] for o in full]
    assert len(out[0]) <= 3 and any(0 < len(o) < 12 for o in out[1:])
    out = backend.generate(prompts, 12, should_stop=lambda ids: ids[-1] == token)
    assert out == [o[: first_index(o, token) + 1] for o in full]


def test_stop_strings_cut_the_text(backend, prompts, tiny_tokenizer):
    settings = GenSettings(max_tokens=12, batch_size=3)
    texts = generate_texts(backend, tiny_tokenizer, prompts, settings)
    word = texts[0].split()[2]
    cut = generate_texts(backend, tiny_tokenizer, prompts, GenSettings(max_tokens=12, batch_size=3, stop=(word,)))
    assert cut == [cut_at_stop(t, (word,)) for t in texts]
    assert cut[0] == texts[0][: texts[0].find(word)] and len(cut[0]) < len(texts[0])


def test_seeded_sampling_is_reproducible(backend, prompts):
    a = backend.generate(prompts, 10, temperature=1.0, top_p=0.95, seed=11)
    assert a == backend.generate(prompts, 10, temperature=1.0, top_p=0.95, seed=11)
    assert a != backend.generate(prompts, 10, temperature=1.0, top_p=0.95, seed=12)
    # a nucleus that holds only the most likely token is greedy decoding
    assert backend.generate(prompts, 10, temperature=1.0, top_p=1e-6, seed=11) == backend.generate(prompts, 10)


def test_adapter_off_is_the_base_model_and_modes_are_restored(backend, prompts):
    weights = {k: v.copy() for k, v in backend.get_adapter_weights().items()}  # torch's may share memory
    backend.model.train()
    off = backend.generate(prompts, 10, adapter=False)
    assert backend.model.training  # back to train mode for the next train_step
    assert off != backend.generate(prompts, 10)  # the adapter changes the output
    zero = {k: (np.zeros_like(v) if k.endswith("lora_B") else v) for k, v in weights.items()}
    try:
        backend.set_adapter_weights(zero)
        assert backend.generate(prompts, 10) == off
    finally:
        backend.set_adapter_weights(weights)
    assert backend.generate(prompts, 10, adapter=True) != off  # the adapter was put back


def test_gradient_checkpointing_does_not_change_generation(backend, prompts, tiny_model_dir):
    checkpointed = tiny_backend(backend.name, tiny_model_dir, grad_checkpointing=True)
    assert checkpointed.generate(prompts, 8) == backend.generate(prompts, 8)


def test_torch_and_mlx_generate_the_same_tokens(loaded, prompts):
    torch_b, mlx_b = loaded("torch"), loaded("mlx")
    w_mlx, w_torch = mlx_b.get_adapter_weights(), torch_b.get_adapter_weights()
    assert set(w_mlx) == set(w_torch) and all(np.array_equal(w_mlx[k], w_torch[k]) for k in w_mlx)
    for kw in ({}, {"adapter": False}, {"temperature": 1.0, "seed": 5}, {"temperature": 0.7, "top_p": 0.8, "seed": 2}):
        assert torch_b.generate(prompts, 12, **kw) == mlx_b.generate(prompts, 12, **kw), kw


# ---------------------------------------------------------------- the embedded SmolLM2


def test_smollm2_greedy_answer_ends_at_im_end(embedded_model_dir):
    """The quickstart's first eval record, rendered by the chat template as in training: the
    base model answers with one numbered line per word and then ends its turn."""
    pytest.importorskip("peft")
    from mlxtune.data.records import encode_prompt
    from mlxtune.models.source import load_tokenizer
    from mlxtune.recipe.loading import load_recipe
    from mlxtune.training.session import load_backend_with_adapter

    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml")
    tok = load_tokenizer(embedded_model_dir, False)
    records = [json.loads(line) for line in (ROOT / "data" / "quickstart" / "cefr_a1_list.jsonl").read_text().splitlines()]
    record = next(r for r in records if r["words"][:2] == ["breakfast", "good"])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in eos_token_ids(tok)
    backend = load_backend_with_adapter("torch", embedded_model_dir, recipe)  # lora_B = 0: the base model
    prompt = encode_prompt(record, recipe.data, tok)
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    import torch

    # On Linux this pytest session preloads OpenBLAS for MLX, and torch's matmuls then use it: with
    # torch's own 2 OpenMP threads on top, the threads fight over 2 cores (measured 20-38 s for
    # this call with 2 torch threads, 5-7 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (ids,) = backend.generate([prompt], 120, should_stop=lambda ids: ids[-1] == end)
    finally:
        torch.set_num_threads(threads)
    assert ids[-1] == end and len(ids) < 120
    lines = tok.decode(ids[:-1]).strip().splitlines()
    assert [line.split(".")[0] for line in lines] == [str(i) for i in range(1, len(record["words"]) + 1)]
    assert all(w.lower() in line.lower() for w, line in zip(record["words"], lines))
