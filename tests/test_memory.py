"""The memory model, the planner and `mlxtune plan`, memory-aware batching, the OOM back-off and
the chunked cross-entropy of both backends.

The accuracy of the model against measured peaks over a grid is bench/memory_grid.py (minutes);
here one small point per backend checks that it is not far off, in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mlxtune.data.batching import collate, split_batch
from mlxtune.cli.main import cli
from mlxtune.data.records import Example
from mlxtune.errors import MlxtuneError
from mlxtune.errors import OutOfMemory, is_out_of_memory
from mlxtune.units import parse_size
from mlxtune.planning.memory import StepSetup, ce_chunk_rows, estimate, lora_parameters, planner_shape
from mlxtune.planning.planner import MARGIN, find_config, make_plan
from mlxtune.recipe.loading import load_recipe

ROOT = Path(__file__).parent.parent
BUNDLED = ROOT / "mlxtune" / "model_configs"
QWEN7B = json.loads((BUNDLED / "Qwen--Qwen2.5-7B-Instruct.json").read_text())
SMOLLM2 = json.loads((BUNDLED / "smollm2-135m-instruct.json").read_text())


# ---------------------------------------------------------------- the model, without a framework


def test_parse_size():
    assert parse_size("16GB") == 16 * 10**9
    assert parse_size("10GiB") == 10 * 2**30
    assert parse_size(" 1.5 gb ") == 1_500_000_000
    assert parse_size("512MB") == 512 * 10**6
    with pytest.raises(MlxtuneError, match='"16GB"'):
        parse_size("lots")


def test_oom_is_recognised():
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_estimate_grows_with_the_work_and_checkpointing_pays_on_deep_models():
    s = StepSetup(backend="torch", rank=16)
    base = estimate(SMOLLM2, s, 2, 256)
    assert estimate(SMOLLM2, s, 4, 256).total > base.total
    assert estimate(SMOLLM2, s, 2, 512).total > base.total
    assert estimate(SMOLLM2, StepSetup(backend="torch", rank=128), 2, 256).adapter > 7 * base.adapter
    ckpt = estimate(SMOLLM2, StepSetup(backend="torch", rank=16, grad_checkpointing=True), 8, 512)
    assert ckpt.activations < estimate(SMOLLM2, s, 8, 512).activations / 10
    # MLX keeps the B x H x T x T attention probabilities: quadratic in the sequence
    mlx = StepSetup(backend="mlx", rank=16)
    grow = estimate(SMOLLM2, mlx, 1, 2048).activations / estimate(SMOLLM2, mlx, 1, 1024).activations
    assert grow > 2.5


def test_weights_follow_dtype_and_quantization():
    shape = planner_shape(QWEN7B)
    n = sum(shape.parameters().values())
    assert 7.5e9 < n < 7.7e9  # Qwen2.5-7B has 7.62B parameters
    bf16 = estimate(QWEN7B, StepSetup(dtype="bfloat16"), 1, 128).weights
    assert bf16 == 2 * n
    mlx4 = estimate(QWEN7B, StepSetup(backend="mlx", dtype="bfloat16", quantize_bits=4), 1, 128).weights
    nf4 = estimate(QWEN7B, StepSetup(backend="torch", dtype="bfloat16", quantize_bits=4), 1, 128).weights
    assert 0.27 * bf16 < mlx4 < 0.31 * bf16  # 4.5 bits a weight, embedding and head included
    # bitsandbytes quantizes the projections only, and peft's prepare_model_for_kbit_training makes
    # the embedding and head float32: 2 x 545M x 4 bytes of Qwen2.5-7B's 7.2 GiB
    assert 0.49 * bf16 < nf4 < 0.53 * bf16


def test_planner_reads_sizes_not_names():
    """Any decoder whose config.json names its sizes is planned (GPT-2's n_layer/n_embd/n_head
    too, once a KeyError); a config without them is refused naming the key."""
    gpt2 = planner_shape({"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": None,
                          "vocab_size": 50257, "tie_word_embeddings": True})
    assert (gpt2.layers, gpt2.hidden, gpt2.intermediate, gpt2.heads, gpt2.kv_heads) == (12, 768, 3072, 12, 12)
    with pytest.raises(MlxtuneError, match="no 'num_attention_heads'"):
        planner_shape({"model_type": "gpt2"}, "x/config.json")
    with pytest.raises(MlxtuneError, match="no 'hidden_size'"):
        planner_shape({"model_type": "llama", "num_attention_heads": 2, "num_hidden_layers": 1})


def test_chunk_rows_keep_a_chunk_near_32_mib():
    assert ce_chunk_rows(128256) * 128256 * 4 <= 32 * 2**20
    assert ce_chunk_rows(256) > 10_000


# ---------------------------------------------------------------- the plan


def test_plan_picks_the_largest_micro_batch_that_fits_and_keeps_the_effective_batch():
    s = StepSetup(backend="torch", rank=16)
    one = estimate(SMOLLM2, s, 1, 512, accumulate=True).total
    four = estimate(SMOLLM2, s, 4, 512, accumulate=True).total
    plan = make_plan(SMOLLM2, s, int((four + estimate(SMOLLM2, s, 8, 512).total) / 2 / MARGIN), 16, 512, checkpointing=False)
    assert (plan.micro_batch, plan.grad_accum) == (4, 4)
    assert plan.max_batch_tokens >= 4 * 512
    tight = make_plan(SMOLLM2, s, int(one / MARGIN) + 1, 16, 512, checkpointing="auto")
    assert tight.fits and tight.grad_checkpointing  # checkpointing buys more than one row a pass
    assert tight.micro_batch > 1 and 16 % tight.micro_batch == 0
    none = make_plan(SMOLLM2, s, 3 * 2**30 // 2, 16, 4096, checkpointing=False)
    assert not none.fits and 0 < none.longest_seq < 4096


def test_token_budget_holds_for_the_longest_sequence():
    s = StepSetup(backend="mlx", rank=8)
    plan = make_plan(SMOLLM2, s, 8 * 2**30, 32, 1024, checkpointing=False, typical_len=128)
    rows = plan.max_batch_tokens // 1024
    assert plan.micro_batch * 1024 > plan.max_batch_tokens  # typical batches are larger than long ones may be
    assert estimate(SMOLLM2, s, rows, 1024).total <= MARGIN * plan.budget < estimate(SMOLLM2, s, rows + 1, 1024).total


def test_find_config_bundled_local_and_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg, where = find_config("Qwen/Qwen2.5-7B-Instruct")
    assert cfg["hidden_size"] == 3584 and "bundled" in where
    snap = tmp_path / "hub" / "models--org--thing" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(SMOLLM2))
    assert find_config("org/thing")[0]["hidden_size"] == 576
    with pytest.raises(MlxtuneError, match="hf download org/other config.json.*--config"):
        find_config("org/other")
    with pytest.raises(MlxtuneError, match="GGUF"):
        find_config("model.Q4.gguf")


QLORA = '''
[model]
path = "Qwen/Qwen2.5-7B-Instruct"
dtype = "bfloat16"
[adapter]
method = "qlora"
rank = 16
alpha = 32
[data]
train = "train.jsonl"
format = "translation"
max_seq_len = 512
[train]
micro_batch = "auto"
effective_batch = 16
'''


def test_plan_command_takes_qlora_and_imports_no_framework(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(QLORA)
    assert load_recipe(path).adapter.method == "qlora"
    # the torch plan on a machine without CUDA says it cannot quantize, still without importing torch
    code = (
        "import sys\n"
        "import mlxtune.models.quantization as q\n"
        "q.cuda_visible = lambda: False\n"
        "from click.testing import CliRunner\n"
        "from mlxtune.cli.main import cli\n"
        f"res = CliRunner().invoke(cli, ['plan', {str(path)!r}, '--budget', '16GB', '--backend', 'mlx'])\n"
        "print(res.output)\n"
        f"res2 = CliRunner().invoke(cli, ['plan', {str(path)!r}, '--budget', '16GB', '--backend', 'torch'])\n"
        "print(res2.output)\n"
        "bad = [m for m in ('torch', 'mlx', 'transformers', 'peft') if m in sys.modules]\n"
        "assert not bad and res.exit_code == 0, (bad, res.exit_code)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={"HF_HUB_CACHE": str(tmp_path / "hub"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "fits" in out.stdout and "micro_batch" in out.stdout and "weights" in out.stdout
    assert "base quantized: mlx affine 4-bit, group 64" in out.stdout
    assert "base quantized: bitsandbytes nf4, double quant, bf16 compute" in out.stdout
    assert "cannot run on this machine" in out.stdout and "--backend mlx" in out.stdout


def test_plan_command_says_when_nothing_fits(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(QLORA.replace('method = "qlora"', 'method = "lora"').replace('dtype = "bfloat16"', 'dtype = "float32"'))
    res = CliRunner().invoke(cli, ["plan", str(path), "--budget", "16GB", "--backend", "torch"])
    assert res.exit_code == 1
    assert "does not fit" in res.output and "quantized model" in res.output


def test_recipe_auto_fields_are_checked(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[data]\ntrain = "d.jsonl"\nformat = "alpaca"\n[train]\nmicro_batch = "auto"\n')
    with pytest.raises(MlxtuneError, match="train.effective_batch"):
        load_recipe(path)
    with pytest.raises(MlxtuneError, match="goes with train.micro_batch"):
        load_recipe(path, ["train.micro_batch=4", "train.effective_batch=8"])
    with pytest.raises(MlxtuneError, match="memory_budget"):
        load_recipe(path, ["train.effective_batch=8", "train.memory_budget=much"])
    r = load_recipe(path, ["train.effective_batch=8", "train.memory_budget=12GB"])
    assert r.train.micro_batch == "auto" and r.train.grad_checkpointing == "auto"


# ---------------------------------------------------------------- batches by token budget


def _batch(lengths):
    ex = [Example(np.arange(1, n + 1, dtype=np.int32), np.arange(n) >= n // 2) for n in lengths]
    return collate(ex, pad_id=0)


def test_split_batch_keeps_every_target_and_respects_the_limits():
    b = _batch([5, 12, 3, 9, 7, 1])
    assert split_batch(b) == [b]
    for rows, tokens in ((2, 0), (0, 24), (3, 20), (0, 5)):
        parts = split_batch(b, rows, tokens)
        assert sum(p.n_targets for p in parts) == b.n_targets
        assert sorted(int(x) for p in parts for x in p.tokens[:, 0]) == [1] * 6
        for p in parts:
            assert not rows or len(p.tokens) <= rows
            assert not tokens or p.tokens.size <= tokens or len(p.tokens) == 1
            assert p.full_mask[:, -1].any() or p.tokens.shape[1] == 1  # re-padded to its longest row
    assert [p.tokens.shape for p in split_batch(b, 0, 24)] == [(2, 12), (3, 7), (1, 1)]


# ---------------------------------------------------------------- with the backends

torch = pytest.importorskip("torch")


def _events(run_dir, kind):
    return [e for e in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if e["event"] == kind]


def test_oom_backoff_halves_the_micro_batch_and_gives_the_same_training(tiny_recipe, monkeypatch):
    """A simulated CUDA out-of-memory on the second micro batch of step 1 (so one pass had
    already accumulated gradients): the step is retried with half the rows per pass, the event is
    in metrics.jsonl, and every loss equals the run that never ran out of memory."""
    from backends.torch_peft import TorchBackend
    from mlxtune.training.session import run

    path = tiny_recipe()
    sets = ["adapter.dropout=0.0", "train.steps=4", "train.eval_every=0"]
    ref_dir, _ = run(load_recipe(path, sets + ["output.name=ref"]), "torch")

    calls = {"n": 0}
    original = TorchBackend._hidden

    def flaky(self, tok):
        if self.model.training:  # train passes only (eval runs the body too)
            calls["n"] += 1
            if calls["n"] == 2 or (calls["n"] > 2 and tok.shape[0] > 2):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return original(self, tok)

    monkeypatch.setattr(TorchBackend, "_hidden", flaky)
    oom_dir, _ = run(load_recipe(path, sets + ["output.name=oom"]), "torch")
    (ev,) = _events(oom_dir.path, "oom_backoff")
    assert ev["step"] == 1 and ev["micro_batch"] == 2 and ev["grad_accum"] == 4 and "simulated" in ev["error"]
    ref, got = _events(ref_dir.path, "train"), _events(oom_dir.path, "train")
    assert [e["step"] for e in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)

    monkeypatch.setattr(TorchBackend, "_hidden", original)
    split_dir, _ = run(load_recipe(path, sets + ["output.name=split", "train.max_batch_tokens=24"]), "torch")
    for a, b in zip(ref, _events(split_dir.path, "train")):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)


def test_oom_with_one_row_per_pass_is_a_clear_error(tiny_recipe, monkeypatch):
    from backends.torch_peft import TorchBackend
    from mlxtune.training.session import run

    def always(self, tok):
        if self.model.training:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(self, tok)

    original = TorchBackend._hidden

    monkeypatch.setattr(TorchBackend, "_hidden", always)
    with pytest.raises(MlxtuneError, match="one example per forward pass.*max_seq_len"):
        run(load_recipe(tiny_recipe(), ["train.steps=2", "eval.before=false"]), "torch")


def test_auto_micro_batch_runs_with_the_plan(tiny_recipe):
    from mlxtune.training.session import run

    sets = ["train.micro_batch=auto", "train.grad_accum=1", "train.effective_batch=8", "train.memory_budget=4GB",
            "train.steps=2", "train.eval_every=0"]
    run_dir, _ = run(load_recipe(tiny_recipe(), sets), "torch")
    resolved = (run_dir.path / "recipe.resolved.toml").read_text()
    assert "micro_batch = 8" in resolved and "grad_checkpointing = false" in resolved
    assert len(_events(run_dir.path, "train")) == 2


def test_torch_chunked_loss_equals_full_logits():
    import torch.nn.functional as F

    from backends.torch_peft import ChunkedNLL

    torch.manual_seed(0)
    h = torch.randn(70, 16, requires_grad=True)
    w, b = torch.randn(300, 16), torch.randn(300)
    t = torch.randint(0, 300, (70,))
    got = ChunkedNLL.apply(h, w, b, t, 16)
    (g_got,) = torch.autograd.grad(2.0 * got, h)
    want = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    (g_want,) = torch.autograd.grad(2.0 * want, h)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert torch.allclose(g_got, g_want, atol=1e-5)


def _tiny_backend(name, model_dir, **train):
    from mlxtune.recipe.loading import recipe_from_dict
    from mlxtune.training.session import load_backend_with_adapter

    recipe = recipe_from_dict({"data": {"train": "x.jsonl", "format": "chat"}, "adapter": {"rank": 4, "alpha": 8.0},
                               "train": {"steps": 2, "lr": 1e-2, **train}})
    b = load_backend_with_adapter(name, model_dir, recipe)
    b.setup_optimizer(recipe)
    return b


def _data(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (3, 37)).astype(np.int32)
    mask = np.zeros_like(tokens, dtype=bool)
    mask[:, 10:] = True
    mask[2, 30:] = False
    return tokens, mask


@pytest.mark.parametrize("name", ["torch", "mlx"])
def test_many_chunks_and_checkpointing_change_nothing(tiny_model_dir, name, monkeypatch):
    """Small chunks (many of them), and gradient checkpointing, give the same losses, eval sums
    and adapter updates as one chunk without checkpointing (the tiny vocabulary is one chunk)."""
    if name == "mlx":
        pytest.importorskip("mlx.core")
        import backends.apple_mlx as am
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    tokens, mask = _data(vocab)
    results = []
    for rows, ckpt in ((None, False), (16, False), (16, True)):
        with monkeypatch.context() as m:
            if rows and name == "mlx":
                m.setattr(am, "ce_chunk_rows", lambda v: rows)
            b = _tiny_backend(name, tiny_model_dir, grad_checkpointing=ckpt)
            if rows and name == "torch":
                b._ce_rows = rows
            losses = [b.train_step(tokens, mask, int(mask[:, 1:].sum()), True, 1e-2) for _ in range(2)]
            ev = b.eval_step(tokens, {"r": mask, "f": np.ones_like(mask)})
        results.append((losses, ev, b.get_adapter_weights()))
    (l0, e0, w0), *others = results
    for losses, ev, w in others:
        assert losses == pytest.approx(l0, rel=1e-5)
        assert ev == pytest.approx(e0, rel=1e-5)
        assert max(float(np.abs(w[k] - w0[k]).max()) for k in w0) < 1e-5


# ---------------------------------------------------------------- one measured point per backend


def test_prediction_is_near_a_measured_peak_torch(tiny_model_dir):
    """torch on CPU: tensor bytes alive at the start of the step plus the profiler's peak of
    allocations during it (the measurement bench/memory_grid.py documents)."""
    from torch.profiler import ProfilerActivity, profile

    from mlxtune.models.source import read_config

    b = _tiny_backend("torch", tiny_model_dir, grad_checkpointing=False)
    vocab = read_config(tiny_model_dir)["vocab_size"]
    tokens = np.random.default_rng(0).integers(1, vocab, (8, 512)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    b.train_step(tokens[:1, :8], mask[:1, :8], 8, True, 1e-3)  # AdamW state exists from here
    live = sum(p.numel() * p.element_size() for p in b.model.parameters())
    live += sum(v.numel() * v.element_size() for st in b.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        b.train_step(tokens, mask, int(mask[:, 1:].sum()), True, 1e-3)
    cur = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    predicted = estimate(read_config(tiny_model_dir), StepSetup(backend="torch", rank=4), 8, 512, accumulate=False)
    assert predicted.step_total == pytest.approx(live + peak, rel=0.15)


def test_prediction_is_near_a_measured_peak_mlx(tiny_model_dir):
    mx = pytest.importorskip("mlx.core")
    from mlxtune.models.source import read_config

    before = mx.get_active_memory()  # arrays other tests left alive
    b = _tiny_backend("mlx", tiny_model_dir, grad_checkpointing=False)
    vocab = read_config(tiny_model_dir)["vocab_size"]
    tokens = np.random.default_rng(0).integers(1, vocab, (8, 512)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    b.train_step(tokens[:1, :8], mask[:1, :8], 8, True, 1e-3)
    b.train_step(tokens, mask, int(mask[:, 1:].sum()), True, 1e-3)
    measured = mx.get_peak_memory() - before
    predicted = estimate(read_config(tiny_model_dir), StepSetup(backend="mlx", rank=4), 8, 512, accumulate=False)
    assert predicted.step_total == pytest.approx(measured, rel=0.15)


def test_lora_parameter_count_matches_the_backend(tiny_model_dir):
    from mlxtune.models.source import read_config

    b = _tiny_backend("torch", tiny_model_dir)
    assert lora_parameters(planner_shape(read_config(tiny_model_dir)), StepSetup(rank=4)) == b.trainable_parameters()
    weights = sum(p.numel() * 4 for n, p in b.model.named_parameters() if "lora_" not in n)
    assert estimate(read_config(tiny_model_dir), StepSetup(rank=4), 1, 8).weights == weights


def test_out_of_memory_is_an_mlxtune_error():
    assert issubclass(OutOfMemory, MlxtuneError)
