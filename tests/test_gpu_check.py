"""bench/gpu_check.py (the one command for the first CUDA GPU), on this CPU: tiny shapes of the
same architectures through the same code paths, the result files, time limits and failures;
and that the GPU machine (no network) has every module the check imports."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# What the GPU image's Python holds (/work/.library/device/KINDS.md, "Python packages already
# there"), as import names, limited to what an ML check could reach for.
GPU_IMAGE = {"torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy", "click", "rich",
             "pandas", "pyarrow", "xxhash", "fsspec", "huggingface_hub", "yaml", "requests", "tqdm", "jinja2",
             "packaging", "psutil", "filelock", "sacrebleu", "tensorboard", "pytest", "triton", "sentencepiece"}
LOCAL = {"bench", "mlxtune", "backends"}
IMPORT_NAME = {"tomli-w": "tomli_w"}


def carried_wheels() -> dict[str, str]:
    """name -> version of the WHEELS=(...) list in bench/gpu_check.sh."""
    m = re.search(r"^WHEELS=\(([^)]*)\)", (BENCH / "gpu_check.sh").read_text(), re.M)
    assert m, "bench/gpu_check.sh has no WHEELS=(...) line"
    return dict(w.split("==") for w in m.group(1).split())


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every import in the file, those inside functions too."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_gpu_check_needs_only_the_gpu_image_and_the_carried_wheels():
    wheels = carried_wheels()
    pins = dict(line.split("==") for line in (ROOT / "mlxtune" / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in pins.items()}
    for name, version in wheels.items():  # the tested versions, so the GPU runs what the suite ran
        assert pins.get(name) == version, f"{name}=={version} is not the pin of mlxtune/constraints.txt"
    available = GPU_IMAGE | LOCAL | set(sys.stdlib_module_names) | {IMPORT_NAME.get(n, n) for n in wheels}
    files = sorted(BENCH.glob("gpu_*.py")) + [BENCH / "trl_sft.py"]
    assert len(files) >= 4
    for path in files:
        missing = imported_modules(path) - available
        assert not missing, f"{path.name} imports {sorted(missing)}: neither on the GPU image nor in gpu_check.sh's WHEELS"
    # mlxtune's own dependencies (pyproject) too: `mlxtune run` and `generate` run there
    deps = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    for dep in re.findall(r'"([A-Za-z0-9_.-]+)', deps):
        assert dep in wheels or IMPORT_NAME.get(dep, dep) in available, f"mlxtune needs {dep}: carry it in WHEELS"


def test_models_keep_each_architecture_and_records_have_the_exact_length(tmp_path):
    pytest.importorskip("transformers")
    from bench import gpu_models
    from mlxtune.recipe.loading import recipe_from_dict
    from mlxtune.training.session import prepare

    full = gpu_models.model_config("qwen2.5-7b-4l", tiny=False)
    assert full["num_hidden_layers"] == 4 and full["hidden_size"] == 3584 and full["vocab_size"] == 152064
    assert gpu_models.model_config("llama-3.2-1b", tiny=False)["num_hidden_layers"] == 16
    for name in gpu_models.MODELS:
        bundled = gpu_models.model_config(name, tiny=False)
        tiny = gpu_models.model_config(name, tiny=True)
        assert (tiny["model_type"], tiny["tie_word_embeddings"]) == (bundled["model_type"], bundled["tie_word_embeddings"])
        assert tiny["hidden_size"] == 64 and tiny["head_dim"] * tiny["num_attention_heads"] == 64
    # one word is one token: mlxtune's own tokenization of a record is exactly seq_len tokens
    gpu_models.build_tokenizer(tmp_path, 300)
    (tmp_path / "config.json").write_text(json.dumps(gpu_models.model_config("llama-3.2-1b", tiny=True)))
    gpu_models.write_jsonl(tmp_path / "train.jsonl", gpu_models.records(6, 48, 300))
    recipe = recipe_from_dict({"model": {"path": str(tmp_path)},
                               "data": {"train": str(tmp_path / "train.jsonl"), "format": "prompt_completion",
                                        "eval_fraction": 0.5, "max_seq_len": 64}, "train": {"steps": 1}})
    _, tokenizer, data = prepare(recipe)
    examples = data.train + data.eval
    assert len(examples) == 6 and {len(e.tokens) for e in examples} == {48}
    assert max(max(e.tokens) for e in examples) < 300 + len(gpu_models.SPECIALS)


def test_report_renders_every_part_and_tolerates_a_half_result():
    from bench.gpu_report import markdown

    result = {"date": "d", "device": "cuda", "environment": {"gpu": "NVIDIA H200", "torch": "2.11"}, "parts": {
        "throughput": {"status": "ok", "seconds": 9, "result": {
            "peak": {"peak_flops": 989e12, "measured_flops": 700e12, "peak_source": "spec sheet", "device": "NVIDIA H200",
                     "matmul_dtype": "bfloat16", "matmul_n": 8192},
            "models": {"llama-3.2-1b": {"micro_batch": 8, "seq": 512, "trained_tok_s": 4e4, "processed_tok_s": 8e4,
                                        "achieved_flops": 3e14, "mfu": 0.3033, "mfu_vs_matmul": 0.43, "peak_memory": 2**31}}}},
        "memory": {"status": "timeout", "seconds": 60, "error": "stopped after 60 s", "result": {
            "model": "llama-3.2-1b", "dtype": "bfloat16", "points": [
                {"micro_batch": 1, "seq": 512, "ckpt": False, "predicted": 3 * 2**30, "measured": 2**31, "ratio": 1.5}]}},
        "trl": {"status": "failed", "seconds": 1, "error": "ModuleNotFoundError: trl | x", "result": {"model": "m"}},
        "cuda_checks": {"status": "ok", "seconds": 3, "result": {"qlora": {"ok": None, "skipped": "bitsandbytes not installed"}}},
    }}
    md = markdown(result)
    assert "| llama-3.2-1b | 8 x 512 | 40000 | 80000 | 300 | 30.3% | 43.0% | 2.00 |" in md
    assert "| 1 | 512 | off | 3072 | 2048 | 1.500 |" in md
    assert "| memory | timeout | 60 | stopped after 60 s |" in md
    assert "ModuleNotFoundError: trl / x" in md  # a pipe would break the table
    assert "skipped: bitsandbytes not installed" in md
    assert "989 TFLOP/s (spec sheet, NVIDIA H200)" in md


def test_gpu_check_runs_on_the_cpu_with_tiny_models(tmp_path):
    """The throughput and memory parts end to end (tiny models built, an mlxtune run, FLOPs,
    the planner grid), a part stopped at its time limit and one that fails, and both files."""
    pytest.importorskip("torch")
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), str(out), "--device", "cpu", "--tiny", "--quick", "--work", str(work),
           "--parts", "throughput,memory,cuda_checks", "--limit", "cuda_checks=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # one part timed out
    res = json.loads((out / "gpu_check.json").read_text())
    parts = res["parts"]
    assert list(parts) == ["models", "throughput", "memory", "cuda_checks"]
    assert parts["models"]["status"] == "ok" and list(parts["models"]["result"]) == ["llama-3.2-1b"]
    assert parts["throughput"]["status"] == "ok", parts["throughput"]
    m = parts["throughput"]["result"]["models"]["llama-3.2-1b"]
    assert m["seq"] == 64 and m["micro_batch"] == 4 and m["steps"] == 2
    assert m["trained_tok_s"] > 0 and 0 < m["trained_share"] < 1 and m["processed_tok_s"] > m["trained_tok_s"]
    flops = m["flops_parts"]
    assert m["flops_per_position"] == pytest.approx(sum(flops.values())) and min(flops.values()) > 0
    assert m["mfu"] == pytest.approx(m["achieved_flops"] / parts["throughput"]["result"]["peak"]["peak_flops"])
    assert parts["throughput"]["result"]["peak"]["peak_source"] == "measured matmul"  # no spec sheet for a CPU
    mem = parts["memory"]
    assert mem["status"] == "ok" and [(p["micro_batch"], p["ckpt"]) for p in mem["result"]["points"]] == [
        (1, False), (2, False), (1, True), (2, True)]
    assert all(p["predicted"] > 0 and p["measured"] is None for p in mem["result"]["points"])
    assert parts["cuda_checks"]["status"] == "timeout" and "stopped after 2 s" in parts["cuda_checks"]["error"]
    md = (out / "gpu_check.md").read_text()
    assert "| model | micro batch x seq | trained tok/s |" in md and "| llama-3.2-1b | 4 x 64 |" in md
    assert "| 2 | 64 | on |" in md and "| cuda_checks | timeout |" in md

    # a part that raises: recorded with its error, the others unaffected
    from bench.gpu_check import run_part

    bad = {"device": "cpu", "tiny": True, "quick": True, "work": str(work), "models": {}}  # no model built
    rec = run_part("cuda_checks", bad, 120)
    assert rec["status"] == "failed" and rec["error"] == "KeyError: 'llama-3.2-1b'" and rec["result"] == {}
