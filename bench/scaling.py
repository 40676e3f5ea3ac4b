"""Data-parallel scaling: the same job (same recipe, same global batch) on 1, 2, ... processes.

    python bench/scaling.py RECIPE [--backend torch|mlx] [--procs 1,2,4,8] [--steps 20] [--micro-batch 4]

Each world size N trains ``--steps`` steps with ``train.micro_batch = global / N`` per process
(global = micro batch x the largest N), started as a user would: ``torchrun --standalone
--nproc-per-node N -m mlxtune run`` (torch) or ``mlx.launch -n N --backend ring -- python -m
mlxtune run`` (MLX; on several Macs pass ``--hostfile`` to mlx.launch yourself). It prints the
trained (target) tokens/s of each run, from the ``end`` event of its metrics.jsonl (rank 0's
count is the global one), the median step's tokens/s (robust to other load), and from the latter the speed-up over the
smallest N and the scaling efficiency (speed-up / N, N = 1 first).
On a multi-GPU machine the torch runs use one GPU per process (NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def launcher(backend: str, n: int) -> list[str]:
    if n == 1:
        return [sys.executable]
    if backend == "torch":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    mlx_launch = shutil.which("mlx.launch")
    if mlx_launch is None:
        sys.exit("mlx.launch is not installed: pip install 'mlx[cpu]' (Linux) or mlx (macOS)")
    return [mlx_launch, "-n", str(n), "--backend", "ring", "--", sys.executable]


def run_one(recipe: Path, backend: str, n: int, micro: int, steps: int, out: Path) -> dict:
    name = f"scaling-{backend}-w{n}"
    cmd = launcher(backend, n) + [
        "-m", "mlxtune", "run", str(recipe), "--backend", backend, "--overwrite", "--no-progress",
        "--set", f"train.micro_batch={micro}", "--set", f"train.steps={steps}", "--set", "train.save_every=0",
        "--set", "train.eval_every=0", "--set", "eval.before=false", "--set", f"output.dir={out}", "--set", f"output.name={name}",
    ]
    env = dict(os.environ)
    if n > 1 and backend == "mlx":  # torchrun sets OMP_NUM_THREADS=1 itself; mlx.launch leaves BLAS threads oversubscribed
        env.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0 or not (out / name / "metrics.jsonl").is_file():
        sys.exit(f"world size {n} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    events = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    end = next(e for e in events if e["event"] == "end")
    # the median step (the first one left out: warm-up) is robust to other load on a shared machine
    steps = sorted(e["tokens_per_s"] for e in events if e["event"] == "train" and e["step"] > 1)
    return {"world_size": n, "micro_batch": micro, "tokens_per_s": end["trained_tokens_per_s"], "seconds": end["train_seconds"],
            "median_step_tokens_per_s": steps[len(steps) // 2] if steps else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--backend", choices=("torch", "mlx"), default="torch")
    ap.add_argument("--procs", default="1,2", help="world sizes, comma-separated (default 1,2)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--micro-batch", type=int, default=4, help="per-process micro batch at the largest world size")
    ap.add_argument("--out", type=Path, default=Path("runs"))
    a = ap.parse_args()
    procs = [int(x) for x in a.procs.split(",")]
    global_rows = a.micro_batch * max(procs)
    print(f"{a.backend}: global micro batch {global_rows} rows, {a.steps} steps, {os.cpu_count()} CPU cores on this machine")
    rows = [run_one(a.recipe.resolve(), a.backend, n, global_rows // n, a.steps, a.out.resolve()) for n in procs]
    key = "median_step_tokens_per_s"
    base = rows[0][key] / rows[0]["world_size"]  # per-process speed of the smallest world
    print(f"{'world':>5} {'micro':>5} {'tokens/s (whole run)':>20} {'tokens/s (median step)':>22} {'speed-up':>8} {'efficiency':>10}")
    for r in rows:
        speedup = r[key] / (base * procs[0]) if base else 0.0
        eff = r[key] / (base * r["world_size"]) if base else 0.0
        print(f"{r['world_size']:>5} {r['micro_batch']:>5} {r['tokens_per_s']:>20.1f} {r[key]:>22.1f} {speedup:>8.2f} {eff:>10.0%}")


if __name__ == "__main__":
    main()
