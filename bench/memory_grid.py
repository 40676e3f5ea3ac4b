"""How well mlxtune's memory model (mlxtune/planning/memory.py) predicts the peak memory of a training step.

Not a test (minutes of CPU): run by hand, one grid point at a time in a fresh subprocess.

    python bench/memory_grid.py                    # the grid, both backends, table + worst/median error
    python bench/memory_grid.py --backend mlx      # one backend
    python bench/memory_grid.py --json out.json    # also write every point
    python bench/memory_grid.py --point '{"backend": "torch", "model": "tiny", "B": 2, "T": 128,
                                          "rank": 8, "ckpt": false}'   # one point, in this process

What is measured, per point (a fresh process: load the model with the backend's own ``load``, add
the adapter, set up AdamW, one small warm-up step so the optimizer state exists, then one
training step of ``B`` rows of ``T`` random tokens with every position after the first a target,
the worst case the planner assumes):

- **mlx**: ``mx.get_peak_memory()`` at the end: the peak of MLX's allocator over the whole
  process (load, warm-up and the step), which is what ``peak_memory`` reports in metrics.jsonl.
- **torch on CPU**: torch has no allocator peak counter off CUDA, so the step runs under
  ``torch.profiler`` with ``profile_memory=True``; the running sum of its allocation and free
  events (in time order) gives the step's peak above its start, to which the bytes of every
  tensor alive at the start are added (parameters, adapter, AdamW state). That is the CPU
  analogue of ``torch.cuda.max_memory_allocated``: tensor bytes only. Its limits: memory that
  does not go through torch's allocator (oneDNN/OpenBLAS scratch, thread stacks, Python) is not
  seen, and neither is what glibc keeps after a free; the process's peak RSS is therefore larger
  (reported in the ``rss`` column: VmHWM, reset through /proc/self/clear_refs before the step,
  minus the RSS before the model was loaded). The mmapped safetensors pages count in RSS too.
- **torch on CUDA** (when a GPU is there): ``torch.cuda.max_memory_allocated``.

The prediction is :func:`mlxtune.planning.memory.estimate` for the same model config, micro batch,
sequence length, rank and checkpointing, without the framework-overhead line (which the
measurements above do not contain).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
MODELS = Path(os.environ.get("MLXTUNE_BENCH_MODELS", Path(tempfile.gettempdir()) / "mlxtune-memory-grid"))

# Random Llama models built on the fly: "tiny" is the test suite's shape (tests/conftest.py).
RANDOM_MODELS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=False),
}

# (model, B, T, rank, checkpointing): tiny and the embedded SmolLM2-135M, sequence 128-1024,
# micro batch 1-8, rank 8-128, checkpointing on and off.
GRID = [
    ("tiny", 1, 128, 8, False),
    ("tiny", 8, 128, 128, False),
    ("tiny", 4, 512, 16, False),
    ("tiny", 8, 1024, 8, False),
    ("tiny", 8, 1024, 64, True),
    ("tiny", 2, 1024, 128, True),
    ("smollm2", 1, 128, 8, False),
    ("smollm2", 8, 128, 16, False),
    ("smollm2", 4, 256, 128, False),
    ("smollm2", 2, 512, 32, False),
    ("smollm2", 1, 1024, 8, False),
    ("smollm2", 8, 256, 64, True),
    ("smollm2", 4, 512, 8, True),
    ("smollm2", 2, 1024, 128, True),
]


def random_config(name: str) -> dict:
    """A named random model, or "rand:d=256,f=512,L=2,H=4,kv=2,V=1000,tie=0" (any shape)."""
    if name in RANDOM_MODELS:
        return RANDOM_MODELS[name]
    keys = {"d": "hidden_size", "f": "intermediate_size", "L": "num_hidden_layers", "H": "num_attention_heads",
            "kv": "num_key_value_heads", "V": "vocab_size", "tie": "tie_word_embeddings"}
    spec = dict(kv.split("=") for kv in name.removeprefix("rand:").split(","))
    return {keys[k]: (bool(int(v)) if k == "tie" else int(v)) for k, v in spec.items()}


# Calibration of MLX's backward working set (mlxtune.planning.memory.MLX_BACKWARD): random llama shapes
# that are none of the grid's models, at several (micro batch, sequence) points; MLP-, hidden- and
# attention-dominated shapes so the three coefficients are told apart.
CALIBRATION_MODELS = [
    "rand:d=256,f=512,L=2,H=4,kv=4,V=512,tie=0",
    "rand:d=256,f=1536,L=2,H=4,kv=4,V=512,tie=0",
    "rand:d=512,f=512,L=2,H=8,kv=8,V=512,tie=0",
    "rand:d=384,f=1024,L=3,H=6,kv=2,V=512,tie=0",
    "rand:d=128,f=2048,L=2,H=2,kv=1,V=512,tie=0",
    "rand:d=96,f=256,L=3,H=6,kv=2,V=512,tie=0",
    "rand:d=48,f=192,L=2,H=2,kv=1,V=512,tie=0",
]
CALIBRATION_SHAPES = [(4, 128), (1, 512), (4, 512), (8, 256), (2, 1024)]


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from mlxtune.models.source import resolve_model

        return resolve_model("embedded:smollm2-135m-instruct")
    path = MODELS / name.replace(":", "_").replace(",", "_").replace("=", "")
    if not (path / "config.json").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                          **random_config(name))
        LlamaForCausalLM(cfg).save_pretrained(path)
    return path


# ---------------------------------------------------------------- one point, in this process


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def measure(point: dict) -> dict:
    import numpy as np

    from mlxtune.recipe.loading import recipe_from_dict
    from mlxtune.training.session import load_backend_with_adapter

    backend = point["backend"]
    if backend == "mlx":
        import mlx.core as mx
    else:
        import torch
    path = model_dir(point["model"])
    recipe = recipe_from_dict({
        "model": {"dtype": point.get("dtype", "float32")},
        "data": {"train": "x.jsonl", "format": "text", "loss_on": "full"},
        "adapter": {"rank": point["rank"], "alpha": 2.0 * point["rank"]},
        "train": {"steps": 2, "grad_checkpointing": bool(point["ckpt"])},
    })
    gc.collect()
    rss0 = _status("VmRSS")
    b = load_backend_with_adapter(backend, path, recipe)
    b.setup_optimizer(recipe)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    warm = rng.integers(3, vocab, (1, 8)).astype(np.int32)
    b.train_step(warm, np.ones_like(warm, dtype=bool), 8, True, 1e-4)
    B, T = point["B"], point["T"]
    tokens = rng.integers(3, vocab, (B, T)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[:, 0] = False
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    out = dict(point)
    if backend == "mlx":
        b.train_step(tokens, mask, int(mask.sum()), True, 1e-4)
        out["measured"] = int(mx.get_peak_memory())
    elif b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        b.train_step(tokens, mask, int(mask.sum()), True, 1e-4)
        out["measured"] = int(torch.cuda.max_memory_allocated())
    else:
        from torch.profiler import ProfilerActivity, profile

        live = sum(p.numel() * p.element_size() for p in b.model.parameters())
        live += sum(v.numel() * v.element_size() for st in b.optimizer.state.values() for v in st.values() if torch.is_tensor(v))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            b.train_step(tokens, mask, int(mask.sum()), True, 1e-4)
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
        cur = peak = 0
        for e in events:
            cur += e.nbytes()
            peak = max(peak, cur)
        out["measured"] = live + peak
    out["seconds"] = time.perf_counter() - t0
    out["rss"] = _status("VmHWM") - rss0
    return out


def predict(point: dict) -> dict:
    from mlxtune.planning.memory import StepSetup, estimate
    from mlxtune.models.source import read_config

    cfg = read_config(model_dir(point["model"]))
    setup = StepSetup(backend=point["backend"], device="cpu", dtype=point.get("dtype", "float32"), rank=point["rank"],
                  grad_checkpointing=bool(point["ckpt"]))
    # one micro batch with its update: no gradients of earlier micro batches are held
    return estimate(cfg, setup, point["B"], point["T"], accumulate=False).as_dict()


# ---------------------------------------------------------------- the grid, one subprocess per point


def run_point(point: dict, timeout: int) -> dict:
    env = dict(os.environ)
    if point["backend"] == "mlx" and Path(OPENBLAS).is_file():
        env["LD_PRELOAD"] = OPENBLAS  # MLX's bundled BLAS is ~20x slower; memory is the same
    proc = subprocess.run([sys.executable, __file__, "--point", json.dumps(point)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"point {point} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The recipes' real models (bundled configs, mlxtune/model_configs): the seeds' setups.
REAL = [
    ("meta-llama/Llama-3.2-1B-Instruct", "LoRA r=128, bf16", dict(dtype="bfloat16", rank=128), 64, 512),
    ("meta-llama/Llama-3.2-1B-Instruct", "QLoRA r=128, 4-bit", dict(dtype="bfloat16", rank=128, quantize_bits=4), 64, 512),
    ("Qwen/Qwen2.5-Coder-1.5B-Instruct", "LoRA r=16, bf16", dict(dtype="bfloat16", rank=16), 16, 1024),
    ("Qwen/Qwen2.5-7B-Instruct", "QLoRA r=16, 4-bit", dict(dtype="bfloat16", rank=16, quantize_bits=4), 16, 512),
]


def real_models() -> None:
    """The plan for the recipes' real models at 16 GB and 24 GB, MLX on a Mac and torch on CUDA."""
    from rich.console import Console
    from rich.table import Table

    from mlxtune.units import gib
    from mlxtune.planning.memory import StepSetup, estimate
    from mlxtune.planning.planner import SHARE, find_config, make_plan

    table = Table(title="batch plans from the memory model: a 16 or 24 GiB Mac (MLX, 70% budget) or GPU (torch, "
                        "90%), the recipe's effective batch kept, every example up to max_seq_len")
    for col in ("model", "adapter", "eff. batch x seq", "machine", "weights", "plan (micro x accum, ckpt)",
                "predicted peak", "longest seq, 1 row", "micro 16, no ckpt"):
        table.add_column(col)
    for model, adapter, kw, effective, seq in REAL:
        cfg, _ = find_config(model)
        for backend, device in (("mlx", "metal"), ("torch", "cuda")):
            for size in (16, 24):
                setup = StepSetup(backend=backend, device=device, **kw)
                plan = make_plan(cfg, setup, int(SHARE[device] * size * 2**30), effective, seq)
                naive = estimate(cfg, setup, min(16, effective), seq).total
                how = (f"{plan.micro_batch} x {plan.grad_accum}, ckpt {'on' if plan.grad_checkpointing else 'off'}"
                       if plan.fits else "does not fit")
                table.add_row(model.split("/")[1], adapter, f"{effective} x {seq}",
                              f"{size} GiB {'Mac, mlx' if backend == 'mlx' else 'GPU, torch'}", gib(plan.estimate.weights),
                              how, gib(plan.estimate.total), str(plan.longest_seq), gib(naive))
    Console(width=220).print(table)


def calibrate(timeout: int) -> None:
    """Measure the calibration points on MLX and fit the per-token counts of (intermediate,
    hidden, heads x seq)-sized arrays of the backward working set, with and without
    checkpointing: least squares on relative error, over what the kept activations, weights and
    adapter do not explain."""
    import numpy as np

    for name in CALIBRATION_MODELS:
        model_dir(name)
    for ckpt in (False, True):
        X, y, scale = [], [], []
        for name in CALIBRATION_MODELS:
            cfg = random_config(name)
            for B, T in CALIBRATION_SHAPES:
                res = run_point({"backend": "mlx", "model": name, "B": B, "T": T, "rank": 8, "ckpt": ckpt}, timeout)
                p, tokens = res["predicted"], B * T
                work = res["measured"] - p["weights"] - p["adapter"] - p["activations"]
                X.append([4 * cfg["intermediate_size"], 4 * cfg["hidden_size"], 4 * cfg["num_attention_heads"] * T])
                y.append(work / tokens)
                scale.append(tokens / res["measured"])
        X, y, w = np.array(X, float), np.array(y), np.array(scale)[:, None]
        coef = np.linalg.lstsq(X * w, y * w[:, 0], rcond=None)[0]
        err = np.abs((X @ coef - y) * w[:, 0])
        print(f"checkpointing {'on ' if ckpt else 'off'}: (intermediate, hidden, heads x seq) arrays per token = "
              f"({coef[0]:.2f}, {coef[1]:.2f}, {coef[2]:.2f}); {len(y)} points, worst fit error {err.max():.1%}, "
              f"median {np.median(err):.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["mlx", "torch", "both"], default="both")
    ap.add_argument("--point", help="measure one point (JSON) in this process and print it")
    ap.add_argument("--models", default="tiny,smollm2", help="comma-separated models of the grid to run")
    ap.add_argument("--json", help="write all points to this file")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--calibrate", action="store_true", help="measure the calibration points and fit mlxtune.planning.memory.MLX_BACKWARD")
    ap.add_argument("--real-models", action="store_true", help="print the plans for the recipes' real models (no measurement)")
    args = ap.parse_args()
    if args.real_models:
        real_models()
        return
    if args.calibrate:
        calibrate(args.timeout)
        return
    if args.point:
        point = json.loads(args.point)
        out = measure(point)
        out["predicted"] = predict(point)
        print(json.dumps(out))
        return

    from rich.console import Console
    from rich.table import Table

    backends = ["torch", "mlx"] if args.backend == "both" else [args.backend]
    models = args.models.split(",")
    for name in set(models):
        model_dir(name)  # build random models once, before the measured processes
    rows = []
    for backend in backends:
        for model, B, T, rank, ckpt in GRID:
            if model not in models:
                continue
            point = {"backend": backend, "model": model, "B": B, "T": T, "rank": rank, "ckpt": ckpt}
            res = run_point(point, args.timeout)
            pred = res["predicted"]["step_total"]
            res["error"] = (pred - res["measured"]) / res["measured"]
            rows.append(res)
            print(f"{backend:5} {model:8} B={B} T={T:4} r={rank:3} ckpt={int(ckpt)}: measured {res['measured'] / 2**20:8.1f} MiB"
                  f"  predicted {pred / 2**20:8.1f} MiB  error {res['error']:+.1%}  ({res['seconds']:.0f} s)", flush=True)
    table = Table(title="predicted vs measured peak memory of one training step (MiB)")
    for col in ("backend", "model", "B", "T", "rank", "ckpt", "measured", "predicted", "error", "rss"):
        table.add_column(col, justify="left" if col in ("backend", "model") else "right")
    for r in rows:
        table.add_row(r["backend"], r["model"], str(r["B"]), str(r["T"]), str(r["rank"]), "on" if r["ckpt"] else "off",
                      f"{r['measured'] / 2**20:.1f}", f"{r['predicted']['step_total'] / 2**20:.1f}", f"{r['error']:+.1%}",
                      f"{r['rss'] / 2**20:.0f}")
    Console().print(table)
    for backend in backends:
        errs = [abs(r["error"]) for r in rows if r["backend"] == backend]
        if errs:
            print(f"{backend}: {len(errs)} points, worst |error| {max(errs):.1%}, median {statistics.median(errs):.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
