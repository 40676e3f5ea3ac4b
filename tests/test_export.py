"""`mlxtune export RUN --format merged OUT` (issue 14): a run's LoRA/DoRA adapter folded into the
base weights gives the same logits as the base + adapter on the backend that trained it, loaded
by stock transformers and by stock mlx-lm (fp32, tiny Llama with rope theta 50000); prompt and
prefix runs are refused with a pointer to their PEFT folder; OUT is never half-written.
``--format peft`` / ``--format mlx``: the adapter as stock peft and stock mlx-lm (with the base
folder it needs) load it, giving mlxtune's own logits (GGUF: tests/test_export_gguf.py)."""

import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mlxtune.cli.main import cli
from mlxtune.export import merge
from mlxtune.models import safetensors_io as st
from mlxtune.export.merge import export_merged
from mlxtune.recipe.loading import load_recipe

TOL = 1e-4
TOKENS = np.random.default_rng(3).integers(7, 90, size=(2, 14)).astype(np.int32)


def train(tiny_recipe, backend, method, steps=3, extra=()):
    from mlxtune.training.session import run

    path = tiny_recipe()
    if method in ("prompt", "prefix"):  # no rank / alpha for virtual tokens
        path.write_text(path.read_text().replace("rank = 4\nalpha = 8\n", ""))
    r = load_recipe(path, [f"adapter.method={method}", "adapter.dropout=0.0", f"train.steps={steps}",
                                    f"train.eval_every={steps}", "train.lr=2e-2", "train.warmup_steps=0",
                                    "train.micro_batch=2", "train.grad_accum=1", "eval.before=false", *extra])
    run_dir, _ = run(r, backend)
    return r, run_dir.path


def hf_logits(folder, tokens=TOKENS):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()


def backend_logits(backend, recipe, model_dir, adapter):
    """Logits of mlxtune's own backend with the run's adapter loaded (the reference)."""
    from mlxtune.training.session import load_backend_with_adapter

    b = load_backend_with_adapter(backend, model_dir, recipe)
    b.load_adapter(adapter)
    if backend == "mlx":
        import mlx.core as mx

        b.model.eval()
        return np.array(b.model(mx.array(TOKENS)))
    import torch

    b.model.eval()
    with torch.no_grad():
        return b.model(input_ids=torch.from_numpy(TOKENS).long()).logits.numpy()


def mlx_lm_logits(folder):
    import mlx.core as mx
    from mlx_lm.utils import load

    model, _ = load(str(folder))
    return np.array(model(mx.array(TOKENS)))


@pytest.mark.parametrize("backend,method", [("torch", "lora"), ("mlx", "lora"), ("torch", "dora"), ("mlx", "dora")])
def test_merged_export_gives_the_adapters_logits(tiny_recipe, tiny_model_dir, tmp_path, backend, method):
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    recipe, run = train(tiny_recipe, backend, method)
    out = tmp_path / "merged"
    res = export_merged(run, out, "float32")
    assert res.adapter == run / "best" / "adapter" and res.merged_modules == 2 * 7 and res.method == method
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 50000.0 and cfg["dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template  # the chat template came along

    ref = backend_logits(backend, recipe, tiny_model_dir, res.adapter)
    moved = float(np.abs(ref - hf_logits(tiny_model_dir)).max())
    d_hf = float(np.abs(hf_logits(out) - ref).max())
    line = f"{backend} {method}: adapter moved logits by {moved:.3e}; merged vs base+adapter: transformers {d_hf:.2e}"
    d_mlx = float(np.abs(mlx_lm_logits(out) - ref).max()) if importlib.util.find_spec("mlx_lm") else None
    print(line + (f", mlx-lm {d_mlx:.2e}" if d_mlx is not None else ", mlx-lm not installed"))
    assert moved > 1e-2, "the trained adapter should change the logits, else this test proves nothing"
    assert d_hf <= TOL and (d_mlx is None or d_mlx <= TOL)


def test_merged_export_of_a_quantized_mlx_run_is_its_dequantized_base(tiny_recipe, tiny_model_dir, tmp_path, monkeypatch):
    """A 4-bit MLX base: the export folds the adapter into the de-quantized base the run trained on, and says so."""
    pytest.importorskip("mlx_lm")
    recipe, run = train(tiny_recipe, "mlx", "lora", extra=("model.quantize_bits=4",))
    res = export_merged(run, tmp_path / "merged", "float32")
    assert len(res.notes) == 1 and "quantized to 4 bits" in res.notes[0] and "de-quantized" in res.notes[0]
    ref = backend_logits("mlx", recipe, tiny_model_dir, res.adapter)
    d_hf = float(np.abs(hf_logits(tmp_path / "merged") - ref).max())
    d_mlx = float(np.abs(mlx_lm_logits(tmp_path / "merged") - ref).max())
    monkeypatch.setattr(merge, "_dequantizer", lambda *a: None)  # merged into the unquantized weights instead
    quant = float(np.abs(hf_logits(export_merged(run, tmp_path / "full", "float32").path) - ref).max())
    print(f"mlx 4-bit lora: merged vs quantized base+adapter: transformers {d_hf:.2e}, mlx-lm {d_mlx:.2e}; "
          f"vs merging into the unquantized weights instead: {quant:.2e}")
    assert d_hf <= TOL and d_mlx <= TOL and quant > 1e-3


def test_merged_export_of_an_mlx_lm_quantized_folder(tiny_recipe, tiny_model_dir, tmp_path):
    """A base folder quantized by mlx-lm (packed weights + scales + biases) comes out de-quantized
    and merged, full precision, with no scales/biases and no "quantization" in its config."""
    mlx_lm = pytest.importorskip("mlx_lm")
    q4 = tmp_path / "q4"
    mlx_lm.convert(str(tiny_model_dir), str(q4), quantize=True, q_group_size=64, q_bits=4, dtype="float32")
    recipe, run = train(tiny_recipe, "mlx", "lora", extra=(f"model.path={q4}", "model.quantize_bits=4"))
    res = export_merged(run, tmp_path / "merged", "float32")
    assert len(res.notes) == 1 and "by mlx-lm" in res.notes[0]
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    names = st.read_header(tmp_path / "merged" / "model.safetensors")[1]
    assert "quantization" not in cfg and not [n for n in names if n.endswith((".scales", ".biases"))]
    assert res.tensors == len(names) == 21 and all(v["dtype"] == "F32" for v in names.values())
    ref = backend_logits("mlx", recipe, q4, res.adapter)
    d_hf = float(np.abs(hf_logits(tmp_path / "merged") - ref).max())
    d_mlx = float(np.abs(mlx_lm_logits(tmp_path / "merged") - ref).max())
    print(f"mlx-lm 4-bit folder, lora: merged vs quantized base+adapter: transformers {d_hf:.2e}, mlx-lm {d_mlx:.2e}")
    assert d_hf <= TOL and d_mlx <= TOL


def test_export_is_atomic_sharded_and_refuses_an_existing_folder(tiny_recipe, tmp_path, monkeypatch):
    _, run = train(tiny_recipe, "torch", "lora", steps=2)
    one = export_merged(run, tmp_path / "one", "float32", adapter="final")
    assert one.adapter == run / "adapters" and one.shards == ["model.safetensors"]
    many = export_merged(run, tmp_path / "many", "float32", adapter="final", shard_bytes=60_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(many.shards) > 2 and sorted(set(index["weight_map"].values())) == many.shards
    d = float(np.abs(hf_logits(tmp_path / "many") - hf_logits(tmp_path / "one")).max())
    print(f"{len(many.shards)} shards vs one file: max |logit diff| {d:.1e}")
    assert d == 0.0

    res = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "one"), "--dtype", "float32"])
    assert res.exit_code == 2 and "already exists" in res.output and "--overwrite" in res.output

    res = CliRunner().invoke(cli, ["export", str(run), str(run), "--overwrite"])
    assert res.exit_code == 2 and "export into a new folder" in res.output and (run / "metrics.jsonl").is_file()

    before = (tmp_path / "one" / "model.safetensors").read_bytes()

    def fail(*a, **k):
        raise RuntimeError("killed while writing")
    monkeypatch.setattr(merge, "_write_side_files", fail)
    with pytest.raises(RuntimeError):
        export_merged(run, tmp_path / "one", "bfloat16", overwrite=True)
    with pytest.raises(RuntimeError):
        export_merged(run, tmp_path / "new", "bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp folder left
    assert not (tmp_path / "new").exists() and (tmp_path / "one" / "model.safetensors").read_bytes() == before


def test_export_cli_bfloat16(tiny_recipe, tmp_path):
    """The command end to end: bfloat16 weights that transformers reads, logits close to fp32's."""
    _, run = train(tiny_recipe, "torch", "lora", steps=2)
    res = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert "lora adapter" in res.output and "bfloat16" in res.output
    export_merged(run, tmp_path / "fp32", "float32")
    d = float(np.abs(hf_logits(tmp_path / "bf16") - hf_logits(tmp_path / "fp32")).max())
    print(f"bfloat16 vs float32 export: max |logit diff| {d:.2e}")
    assert 0 < d < 0.1


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_export_refuses_virtual_token_runs(tmp_path, tiny_model_dir, method):
    run = tmp_path / "run"
    (run / "adapters").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    (run / "recipe.resolved.toml").write_text(f'[model]\npath = "{tiny_model_dir}"\n[adapter]\nmethod = "{method}"\n'
                                               '[data]\ntrain = "x.jsonl"\nformat = "chat"\n')
    res = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "cannot be merged" in res.output and str(run / "adapters") in res.output and "PeftModel" in res.output
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_unknown_format_and_misplaced_options(tmp_path):
    res = CliRunner().invoke(cli, ["export", str(tmp_path), str(tmp_path / "o"), "--format", "onnx"])
    assert res.exit_code == 2 and "'onnx' is not one of 'merged', 'peft', 'mlx', 'gguf'" in res.output
    res = CliRunner().invoke(cli, ["export", str(tmp_path), str(tmp_path / "o"), "--format", "gguf", "--dtype", "float16"])
    assert res.exit_code == 2 and "--dtype applies to --format merged only; for --format gguf use --outtype" in res.output
    res = CliRunner().invoke(cli, ["export", str(tmp_path), str(tmp_path / "o"), "--format", "peft", "--outtype", "q8_0"])
    assert res.exit_code == 2 and "--outtype applies to --format gguf only" in res.output


# ---------------------------------------------------------------- --format peft | mlx


def peft_model(model_dir, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def test_peft_export_of_an_mlx_run_loads_in_stock_peft(tiny_recipe, tiny_model_dir, tmp_path):
    """The MLX run's peft/ copy, and the same written from an mlx-lm-only folder (--adapter PATH):
    stock PeftModel gives the MLX backend's logits."""
    import shutil

    import torch

    pytest.importorskip("mlx_lm")
    pytest.importorskip("peft")
    recipe, run = train(tiny_recipe, "mlx", "lora")
    res = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "peft"), "--format", "peft"])
    assert res.exit_code == 0, res.output
    assert "(copied)" in res.output and "PeftModel.from_pretrained" in res.output
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    only_mlx = tmp_path / "only-mlx"
    shutil.copytree(run / "best" / "adapter", only_mlx, ignore=shutil.ignore_patterns("peft"))
    from mlxtune.export.adapter import export_adapter

    written = export_adapter(run, tmp_path / "written", "peft", adapter=str(only_mlx))
    assert written.how == "written"
    ref = backend_logits("mlx", recipe, tiny_model_dir, run / "best" / "adapter")
    moved = float(np.abs(ref - hf_logits(tiny_model_dir)).max())
    diffs = []
    for folder in (tmp_path / "peft", tmp_path / "written"):
        with torch.no_grad():
            stock = peft_model(tiny_model_dir, folder)(input_ids=torch.from_numpy(TOKENS).long()).logits.numpy()
        diffs.append(float(np.abs(stock - ref).max()))
    print(f"mlx lora -> peft: stock PeftModel vs MLX backend: copied {diffs[0]:.2e}, written {diffs[1]:.2e} (adapter moved {moved:.2e})")
    assert moved > 1e-2 and max(diffs) <= TOL


def test_peft_export_of_a_prompt_run(tiny_recipe, tiny_model_dir, tmp_path):
    """Prompt tuning exports to PEFT (its only form) and is refused for mlx-lm, with the pointer to peft."""
    import torch

    pytest.importorskip("peft")
    recipe, run = train(tiny_recipe, "torch", "prompt", extra=("adapter.num_virtual_tokens=4",))
    from mlxtune.export.adapter import export_adapter

    res = export_adapter(run, tmp_path / "peft", "peft")
    assert res.how == "copied" and res.method == "prompt"
    with torch.no_grad():
        out = peft_model(tiny_model_dir, tmp_path / "peft")(input_ids=torch.from_numpy(TOKENS).long()).logits.numpy()
        own = peft_model(tiny_model_dir, res.adapter)(input_ids=torch.from_numpy(TOKENS).long()).logits.numpy()
    assert np.array_equal(out, own)
    cli_res = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "mlx"), "--format", "mlx"])
    assert cli_res.exit_code == 2 and "mlx-lm has no prompt tuning" in cli_res.output and "--format peft" in cli_res.output
    assert not (tmp_path / "mlx").exists()
    cli_res = CliRunner().invoke(cli, ["export", str(run), str(tmp_path / "g.gguf"), "--format", "gguf"])
    assert cli_res.exit_code == 2 and "cannot be merged" in cli_res.output and "PeftModel" in cli_res.output


def mlx_lm_adapter_logits(out):
    import mlx.core as mx
    from mlx_lm.utils import load

    model, _ = load(str(out / "base"), adapter_path=str(out / "adapter"))
    model.eval()
    return np.array(model(mx.array(TOKENS)))


def test_mlx_export_of_a_torch_run_loads_in_stock_mlx_lm(tiny_recipe, tiny_model_dir, tmp_path):
    """A torch run on the tiny Llama with rope theta 50000 saved the transformers-5 way
    (rope_parameters only): stock mlx_lm.utils.load(OUT/base, adapter_path=OUT/adapter) gives the
    torch backend's logits; without the top-level rope_theta in OUT/base it does not."""
    pytest.importorskip("mlx_lm")
    assert "rope_theta" not in json.loads((tiny_model_dir / "config.json").read_text())  # the trap is armed
    recipe, run = train(tiny_recipe, "torch", "lora")
    out = tmp_path / "mlx"
    res = CliRunner().invoke(cli, ["export", str(run), str(out), "--format", "mlx"])
    assert res.exit_code == 0, res.output
    assert "weights hard-linked" in res.output and "(copied)" in res.output
    assert json.loads((out / "base" / "config.json").read_text())["rope_theta"] == 50000.0
    assert (out / "base" / "model.safetensors").stat().st_ino == (tiny_model_dir / "model.safetensors").stat().st_ino
    readme = (out / "README.txt").read_text()
    assert f"mlx_lm.generate --model {out.resolve() / 'base'} --adapter-path {out.resolve() / 'adapter'}" in readme
    ref = backend_logits("torch", recipe, tiny_model_dir, run / "best" / "adapter")
    d = float(np.abs(mlx_lm_adapter_logits(out) - ref).max())
    cfg = json.loads((out / "base" / "config.json").read_text())
    (out / "base" / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "rope_theta"}))
    off = float(np.abs(mlx_lm_adapter_logits(out) - ref).max())
    # a PEFT-only adapter folder (--adapter PATH): the mlx-lm files are written from its weights
    import shutil

    from mlxtune.export.adapter import export_adapter

    only_peft = tmp_path / "only-peft"
    shutil.copytree(run / "best" / "adapter", only_peft, ignore=shutil.ignore_patterns("mlx"))
    written = export_adapter(run, tmp_path / "written", "mlx", adapter=str(only_peft))
    assert written.how == "written" and written.base_weights == "hard-linked"
    d_written = float(np.abs(mlx_lm_adapter_logits(tmp_path / "written") - ref).max())
    print(f"torch lora -> mlx: stock mlx-lm vs torch backend {d:.2e} (written from PEFT files: {d_written:.2e}); "
          f"without the top-level rope_theta {off:.2e}")
    assert d <= TOL and d_written <= TOL and off > 10 * TOL  # random tiny weights: near-uniform attention, rope matters less


def test_mlx_export_of_a_quantized_mlx_run_and_refusals(tiny_recipe, tiny_model_dir, tmp_path):
    """A 4-bit MLX run: base/ holds the base de-quantized as the run saw it, so stock mlx-lm gives
    the run's logits; an adapter whose mlx/ holds WHY_NOT.txt is refused with that reason."""
    import shutil

    pytest.importorskip("mlx_lm")
    from mlxtune.export.adapter import export_adapter

    recipe, run = train(tiny_recipe, "mlx", "lora", extra=("model.quantize_bits=4",))
    res = export_adapter(run, tmp_path / "mlx", "mlx")
    assert res.base_weights == "de-quantized" and len(res.notes) == 1 and "de-quantized" in res.notes[0]
    ref = backend_logits("mlx", recipe, tiny_model_dir, res.adapter)
    d = float(np.abs(mlx_lm_adapter_logits(tmp_path / "mlx") - ref).max())
    print(f"mlx 4-bit lora -> mlx: stock mlx-lm vs MLX backend {d:.2e}")
    assert d <= TOL
    with pytest.raises(Exception, match="already exists"):
        export_adapter(run, tmp_path / "mlx", "mlx")

    _, trun = train(tiny_recipe, "torch", "lora", steps=2, extra=("output.name=torch",))
    bad = tmp_path / "bad"
    shutil.copytree(trun / "adapters", bad)
    shutil.rmtree(bad / "mlx")
    (bad / "mlx").mkdir()
    (bad / "mlx" / "WHY_NOT.txt").write_text("lm_head: mlx-lm's adapter format adapts only layers inside the blocks\n")
    res = CliRunner().invoke(cli, ["export", str(trun), str(tmp_path / "out"), "--format", "mlx", "--adapter", str(bad)])
    assert res.exit_code == 2 and "WHY_NOT.txt: lm_head: mlx-lm's adapter format" in res.output and "--format peft" in res.output
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
