"""Shared pytest fixtures."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` (the tiny tokenizer's builder), under bare `pytest` too

from mlxtune.system import blas


def pytest_configure(config):
    """MLX's Linux wheel bundles a ~20x slower BLAS: re-run this pytest command once with
    Debian's OpenBLAS preloaded, before any test module imports mlx (no-op elsewhere;
    MLXTUNE_NO_OPENBLAS=1 skips it). Output capture is suspended first so the new process
    writes to the real terminal."""
    if blas.should_reexec(in_pytest=True):
        capture = config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.suspend_global_capture(in_=True)
        blas.maybe_reexec_with_openblas(in_pytest=True)


@pytest.fixture(scope="session")
def embedded_model_dir():
    """The embedded SmolLM2-135M-Instruct as a Hugging Face folder.

    Uses the ordinary cache (`$MLXTUNE_CACHE` if set, else `~/.cache/mlxtune`), so the one-time
    GGUF conversion (~25 s, ~540 MB) is shared with the quickstart and later test sessions.
    """
    from mlxtune.models.source import resolve_model

    return resolve_model("embedded:smollm2-135m-instruct")


# ---------------------------------------------------------------- tiny assets built in code

WORDS = (
    "the a is are one two three four five six seven eight nine ten red blue green cat dog sun moon "
    "hello world count to say please translate english turkish text sentence word words generate "
    "level sentences for these using each naturally and appropriately provide numbered write python "
    "def return x y add plus minus code problem solution yes no what color sky grass big small"
).split()
PUNCT = list(":.,!?()-'\"`#=+*/1234567890")
from bench.gpu_models import CHAT_TEMPLATE  # noqa: E402,F401  (re-exported: the tiny tokenizer's template)


def build_tiny_tokenizer(path):
    """A word-level tokenizer with a chat template and BOS added by default: ids are readable
    (bench/gpu_models.py builds it; the GPU check uses the same one)."""
    from bench.gpu_models import build_tokenizer

    return build_tokenizer(path, sorted(set(WORDS + PUNCT + ["###", "Instruction", "Response", "Generate", "A1", "Translate", "English", "Turkish"])))


def build_tiny_llama(path, vocab_size, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512,
                      tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    LlamaForCausalLM(cfg).save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-block random Llama (hidden 64) with the tiny tokenizer, in Hugging Face format."""
    pytest.importorskip("torch")
    path = tmp_path_factory.mktemp("tiny_llama")
    tok = build_tiny_tokenizer(path)
    build_tiny_llama(path, len(tok))
    return path


TINY_RECORDS = [
    {"prompt": f"count to {n}", "completion": " ".join(["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"][:k])}
    for n, k in [("three", 3), ("five", 5), ("two", 2), ("four", 4), ("six", 6), ("seven", 7), ("eight", 8), ("nine", 9), ("ten", 10)]
] + [
    {"prompt": "what color is the sky", "completion": "the sky is blue"},
    {"prompt": "what color is the grass", "completion": "the grass is green"},
    {"prompt": "say hello", "completion": "hello world"},
]


def write_jsonl(path, records):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# The model, adapter and data sections of the tiny test recipes (data in train.jsonl beside them).
TINY_RECIPE_HEAD = '''[model]
path = "{model}"

[adapter]
rank = 4
alpha = 8

[data]
train = "train.jsonl"
format = "prompt_completion"
eval_fraction = 0.25
max_seq_len = 64
'''


@pytest.fixture
def tiny_recipe(tmp_path, tiny_model_dir):
    """Write a recipe for the tiny model + a tiny prompt/completion set; returns its path.
    Tests vary it with --set overrides."""
    write_jsonl(tmp_path / "train.jsonl", TINY_RECORDS * 4)

    def write(name: str = "recipe.toml"):
        text = TINY_RECIPE_HEAD.format(model=tiny_model_dir) + f'''
[train]
steps = 12
lr = 1e-2
warmup_steps = 2
micro_batch = 4
grad_accum = 2
eval_every = 6

[output]
dir = "{tmp_path / 'runs'}"
name = "tiny"
'''
        p = tmp_path / name
        p.write_text(text)
        return p

    return write


def crash_train_step(monkeypatch, cls, after):
    """Make ``cls.train_step`` raise RuntimeError("simulated crash") after ``after`` calls (a crash in
    the middle of a run); returns the original method."""
    calls, original = [0], cls.train_step

    def crashing(self, *a, **k):
        calls[0] += 1
        if calls[0] > after:
            raise RuntimeError("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(cls, "train_step", crashing)
    return original


def train_run(backend_name, model_dir, recipe, train, evals, path, resume=False, fail_after=None):
    """loop.train on a fresh backend into run dir ``path``; with ``fail_after``, train_step raises
    a simulated crash after that many calls (for resume tests)."""
    from mlxtune.training import loop
    from mlxtune.runs.rundir import RunDir
    from mlxtune.training.session import load_backend_with_adapter

    b = load_backend_with_adapter(backend_name, model_dir, recipe)
    b.setup_optimizer(recipe)
    if fail_after is not None:
        calls, orig = [0], b.train_step

        def step(*a, **k):
            calls[0] += 1
            if calls[0] > fail_after:
                raise RuntimeError("simulated crash")
            return orig(*a, **k)
        b.train_step = step
    return loop.train(b, train, evals, recipe.train, recipe.eval, RunDir.create(path, resume=resume), 0,
                      resume=resume)


def ragged_batches(seed, n, vocab, b=2, lens=(9, 13, 7, 11)):
    """``n`` right-padded (pad id 0) int32 batches of ``b`` rows with response-style masks: rows
    get shorter by 2 tokens each (unless that leaves fewer than 4), the second half of a row is
    its response."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        width = lens[i % len(lens)]
        tokens = np.zeros((b, width), dtype=np.int32)
        mask = np.zeros((b, width), dtype=bool)
        for r in range(b):
            length = width - (r * 2 if r * 2 < width - 3 else 0)
            tokens[r, :length] = rng.integers(1, vocab, length)
            mask[r, length // 2:length] = True
        out.append((tokens, mask))
    return out


def make_run(root, model_dir, backend, extra=()):
    """A tiny trained run in ``root``/runs/tiny whose adapter clearly moves the replies (tests of generate and chat)."""
    from mlxtune.recipe.loading import load_recipe
    from mlxtune.training.session import run

    write_jsonl(root / "train.jsonl", TINY_RECORDS * 4)
    text = TINY_RECIPE_HEAD.format(model=model_dir) + f'\n[output]\ndir = "{root / "runs"}"\nname = "tiny"\n'
    (root / "recipe.toml").write_text(text)
    r = load_recipe(root / "recipe.toml", ["adapter.dropout=0.0", "train.steps=200", "train.eval_every=200", "train.lr=1e-2",
                                           "train.warmup_steps=0", "train.micro_batch=4", "train.grad_accum=1",
                                           "eval.before=false", *extra])
    run_dir, _ = run(r, backend)
    return run_dir.path


@pytest.fixture(scope="module", params=["torch", "mlx"])
def trained(request, tmp_path_factory, tiny_model_dir):
    backend = request.param
    if backend == "mlx":
        pytest.importorskip("mlx")
    return backend, make_run(tmp_path_factory.mktemp(f"run-{backend}"), tiny_model_dir, backend)
