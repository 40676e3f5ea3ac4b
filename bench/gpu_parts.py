"""The parts of ``bench/gpu_check.py``; each runs in its own process and returns one dict.

Every part gets the context ``ctx`` (device, tiny, quick, work folder, the built models) and a
``save`` callback: what it saves is kept even when the part is stopped at its time limit.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import gpu_models  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Dense bf16 tensor-core peak per NVIDIA's spec sheets (SXM parts; no sparsity), FLOP/s,
# matched against torch.cuda.get_device_name(). Unknown GPU: the measured matmul rate.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
Save = Callable[[dict], None]


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p])
    e["MLXTUNE_NO_OPENBLAS"] = "1"
    return e


def sh(cmd: list[str], log: Path) -> None:
    """Run ``cmd``; a non-zero exit raises with the end of its log."""
    with open(log, "w") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exit {rc}: {log.read_text(errors='replace')[-1500:]}")


# ------------------------------------------------------------------ one mlxtune run


def shape(ctx: dict) -> dict[str, Any]:
    """Rows of ``seq`` tokens per micro batch: 8 x 512 on the GPU."""
    return {"seq": 64 if ctx["tiny"] else 512, "micro_batch": 4 if ctx["tiny"] else 8}


def run_mlxtune(ctx: dict, model: str, label: str, steps: int, dtype: str, autocast: str,
                method: str = "lora", lr: float = 1e-3, ckpt: bool = False) -> list[dict]:
    """``mlxtune run --backend torch`` of LoRA r16 (alpha 32) on all seven projections, on
    synthetic records of exactly ``seq`` tokens; returns its train events (metrics.jsonl)."""
    import tomli_w

    from mlxtune.runs.rundir import read_metrics

    work = Path(ctx["work"]) / label
    work.mkdir(parents=True, exist_ok=True)
    s = shape(ctx)
    words = gpu_models.word_count(gpu_models.model_config(model, ctx["tiny"]))
    gpu_models.write_jsonl(work / "train.jsonl", gpu_models.records(s["micro_batch"] * steps + 4, s["seq"], words))
    recipe = {
        "backend": "torch",
        "model": {"path": ctx["models"][model], "dtype": dtype, "device": ctx["device"]},
        "adapter": {"method": method, "rank": 16, "alpha": 32.0, "target_modules": PROJECTIONS},
        "data": {"train": "train.jsonl", "format": "prompt_completion", "max_seq_len": s["seq"] + 8,
                 "eval_fraction": 4 / (s["micro_batch"] * steps + 4)},
        "train": {"steps": steps, "lr": lr, "schedule": "constant", "micro_batch": s["micro_batch"], "grad_accum": 1,
                  "grad_checkpointing": ckpt, "autocast": autocast, "grad_clip": 0.0},
        "eval": {"before": False, "batch_size": 4},
        "output": {"dir": str(work), "name": "run"},
    }
    (work / "recipe.toml").write_text(tomli_w.dumps(recipe))
    sh([sys.executable, "-m", "mlxtune", "run", str(work / "recipe.toml"), "--overwrite", "--no-progress"], work / "run.log")
    return [e for e in read_metrics(work / "run") if e["event"] == "train"]


def speed(train: list[dict], warmup: int) -> dict[str, float]:
    """Trained and processed tokens/s over the steps after ``warmup``."""
    timed = train[warmup:] or train
    secs = sum(e["tokens"] / e["tokens_per_s"] for e in timed)
    trained = sum(e["tokens"] for e in timed)
    processed = sum(e["processed_tokens_per_s"] * e["tokens"] / e["tokens_per_s"] for e in timed)
    return {"steps": len(timed), "trained_tok_s": trained / secs, "processed_tok_s": processed / secs,
            "trained_share": trained / processed, "peak_memory": max(e["peak_memory"] for e in timed)}


# ------------------------------------------------------------------ parts


def part_models(ctx: dict, save: Save) -> dict:
    """Build the random-weight models (tiny shapes with --tiny; --quick: only the one every part uses)."""
    names = ["llama-3.2-1b"] if ctx["quick"] else list(gpu_models.MODELS)
    out: dict[str, Any] = {}
    for name in names:
        t0 = time.perf_counter()
        path = gpu_models.build_model(name, Path(ctx["work"]) / "models", ctx["tiny"], ctx["device"])
        cfg = json.loads((path / "config.json").read_text())
        out[name] = {"path": str(path), "layers": cfg["num_hidden_layers"], "hidden": cfg["hidden_size"],
                     "vocab": cfg["vocab_size"], "seconds": round(time.perf_counter() - t0, 1)}
        save(out)
    return out


def part_cuda_checks(ctx: dict, save: Save) -> dict:
    """bf16 training (finite, falling loss), greedy generation twice (same text), QLoRA."""
    model = "llama-3.2-1b"
    out: dict[str, Any] = {}
    train = run_mlxtune(ctx, model, "check_bf16", 5, "bfloat16", "bfloat16", lr=2e-3)
    losses = [e["loss"] for e in train]
    ok = len(losses) == 5 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    out["bf16_training"] = {"ok": ok, "losses": losses}
    save(out)
    run_dir = Path(ctx["work"]) / "check_bf16" / "run"
    prompts = gpu_models.write_jsonl(Path(ctx["work"]) / "prompts.jsonl", [{"prompt": "w11 w12 w13 w14"}] * 3)
    texts = []
    for i in range(2):
        gen = Path(ctx["work"]) / f"gen{i}.jsonl"
        sh([sys.executable, "-m", "mlxtune", "generate", str(run_dir), "--file", str(prompts), "--out", str(gen),
            "--temperature", "0", "--max-tokens", "16", "--backend", "torch", "--no-progress"], Path(ctx["work"]) / f"gen{i}.log")
        texts.append([json.loads(line)["output"] for line in gen.read_text().splitlines() if line.strip()])
    same = texts[0] == texts[1] and len(set(texts[0])) == 1
    out["generation"] = {"ok": same, "outputs": texts[0][:1]}
    save(out)
    if ctx["device"] != "cuda":
        out["qlora"] = {"ok": None, "skipped": "no CUDA device"}
    elif not has("bitsandbytes"):
        out["qlora"] = {"ok": None, "skipped": "bitsandbytes not installed"}
    else:
        q = [e["loss"] for e in run_mlxtune(ctx, model, "check_qlora", 3, "bfloat16", "bfloat16", method="qlora")]
        out["qlora"] = {"ok": len(q) == 3 and all(math.isfinite(x) for x in q), "losses": q}
    return out


def peak_flops(ctx: dict) -> dict[str, Any]:
    """The device's bf16 peak (spec sheet by name, else measured) and a measured big matmul rate."""
    import torch

    if ctx["device"] == "cuda":
        name, n, dtype, reps = torch.cuda.get_device_name(0), 8192, torch.bfloat16, 50
    else:
        name, n, dtype, reps = "cpu", 256, torch.float32, 5
    a = torch.randn(n, n, device=ctx["device"], dtype=dtype)
    b = torch.randn(n, n, device=ctx["device"], dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if ctx["device"] == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    measured = 2 * n**3 * reps / (time.perf_counter() - t0)
    spec = next((v for k, v in PEAK_BF16.items() if k in name), None)
    return {"device": name, "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."), "measured_flops": measured,
            "spec_flops": spec, "peak_flops": spec or measured, "peak_source": "spec sheet" if spec else "measured matmul"}


def part_throughput(ctx: dict, save: Save) -> dict:
    """Trained tokens/s and MFU of mlxtune's torch LoRA (bf16 base) per model."""
    from mlxtune.models.shape import ModelShape
    from mlxtune.planning.flops import training_flops

    out: dict[str, Any] = {"peak": peak_flops(ctx), "models": {}}
    save(out)
    warmup, steps = (1, 2) if ctx["tiny"] else (3, 10)
    names = ["llama-3.2-1b"] if ctx["quick"] else list(gpu_models.MODELS)
    for name in names:
        s = shape(ctx)
        sp = speed(run_mlxtune(ctx, name, f"speed_{name}", warmup + steps, "bfloat16", "off"), warmup)
        cfg = gpu_models.model_config(name, ctx["tiny"])
        flops = training_flops(ModelShape.from_config(cfg), 16, set(PROJECTIONS), cfg["num_hidden_layers"], s["seq"],
                               sp["trained_share"])
        achieved = flops.total * sp["processed_tok_s"]
        out["models"][name] = {**sp, **s, "flops_per_position": flops.total,
                               "flops_parts": {k: getattr(flops, k) for k in ("body", "attention", "adapter", "head")},
                               "achieved_flops": achieved, "mfu": achieved / out["peak"]["peak_flops"],
                               "mfu_vs_matmul": achieved / out["peak"]["measured_flops"]}
        save(out)
    return out


def part_memory(ctx: dict, save: Save) -> dict:
    """The planner's step peak against torch.cuda.max_memory_allocated, a grid of micro batches
    with checkpointing off and on (on the CPU: predicted only; torch has no peak counter there)."""
    import numpy as np
    import torch

    from mlxtune.planning.memory import StepSetup, estimate
    from mlxtune.recipe.loading import recipe_from_dict
    from mlxtune.training.session import load_backend_with_adapter

    cuda = ctx["device"] == "cuda"
    name = "llama-3.2-1b"
    path = Path(ctx["models"][name])
    cfg = json.loads((path / "config.json").read_text())
    dtype = "float32" if ctx["tiny"] else "bfloat16"
    seq = 64 if ctx["tiny"] else 512
    grid = [1, 2] if ctx["tiny"] or ctx["quick"] else [1, 2, 4, 8]
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"model": name, "dtype": dtype, "seq": seq, "points": []}
    for ckpt in (False, True):
        recipe = recipe_from_dict({
            "model": {"dtype": dtype, "device": ctx["device"]},
            "data": {"train": "x.jsonl", "format": "text", "loss_on": "full"},
            "adapter": {"rank": 16, "alpha": 32.0, "target_modules": PROJECTIONS},
            "train": {"steps": 2, "grad_checkpointing": ckpt},
        })
        b = load_backend_with_adapter("torch", path, recipe)
        b.setup_optimizer(recipe)
        warm = rng.integers(8, cfg["vocab_size"], (1, 8)).astype(np.int32)
        b.train_step(warm, np.ones_like(warm, dtype=bool), 8, True, 1e-4)  # AdamW state exists from here on
        for rows in grid:
            tokens = rng.integers(8, cfg["vocab_size"], (rows, seq)).astype(np.int32)
            mask = np.ones_like(tokens, dtype=bool)
            mask[:, 0] = False
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            b.train_step(tokens, mask, int(mask.sum()), True, 1e-4)
            measured = int(torch.cuda.max_memory_allocated()) if cuda else None
            setup = StepSetup(backend="torch", device=ctx["device"], dtype=dtype, rank=16, targets=tuple(PROJECTIONS),
                              grad_checkpointing=ckpt)
            predicted = estimate(cfg, setup, rows, seq, accumulate=False).step_total
            out["points"].append({"micro_batch": rows, "seq": seq, "ckpt": ckpt, "predicted": predicted, "measured": measured,
                                  "ratio": predicted / measured if measured else None})
            save(out)
        del b
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return out


def part_trl(ctx: dict, save: Save) -> dict:
    """The same job (fp32 base, bf16 autocast: what bench/trl_sft.py runs) under mlxtune and under
    stock TRL SFTTrainer + peft: trained tokens/s and their ratio."""
    if not has("trl"):
        return {"skipped": "trl not installed"}
    name = "llama-3.2-1b"
    warmup, steps = (1, 2) if ctx["tiny"] else (3, 10)
    s = shape(ctx)
    precision = "bf16" if ctx["device"] == "cuda" else "fp32"
    mine = speed(run_mlxtune(ctx, name, "trl_pair", warmup + steps, "float32",
                             "bfloat16" if precision == "bf16" else "off"), warmup)
    out: dict[str, Any] = {"model": name, "precision": precision, "mlxtune": mine}
    save(out)
    work = Path(ctx["work"]) / "trl"
    work.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (Path(ctx["work"]) / "trl_pair" / "train.jsonl").read_text().splitlines()]
    convs = [{"prompt": [{"role": "user", "content": r["prompt"]}],
              "completion": [{"role": "assistant", "content": r["completion"]}]} for r in rows]
    gpu_models.write_jsonl(work / "train.jsonl", convs[:-4])
    gpu_models.write_jsonl(work / "eval.jsonl", convs[-4:])
    config = {"model": ctx["models"][name], "train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"),
              "work": str(work / "out"), "adapter_dir": str(work / "adapter"), "rank": 16, "alpha": 32.0, "dropout": 0.0,
              "target_modules": PROJECTIONS, "layers": None, "steps": warmup + steps, "micro_batch": s["micro_batch"],
              "eval_batch": 4, "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8, "seed": 3407,
              "max_seq_len": s["seq"] + 8, "precision": precision}
    (work / "config.json").write_text(json.dumps(config))
    sh([sys.executable, str(HERE / "trl_sft.py"), str(work / "config.json"), str(work / "result.json")], work / "trl.log")
    timed = json.loads((work / "result.json").read_text())["steps"][warmup:]
    trl_tok_s = sum(t["trained"] for t in timed) / sum(t["seconds"] for t in timed)
    out["trl"] = {"steps": len(timed), "trained_tok_s": trl_tok_s}
    out["ratio"] = mine["trained_tok_s"] / trl_tok_s
    return out


PARTS = {"models": part_models, "cuda_checks": part_cuda_checks, "throughput": part_throughput,
         "memory": part_memory, "trl": part_trl}
