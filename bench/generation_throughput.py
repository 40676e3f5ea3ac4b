"""Generation throughput, batched vs one prompt at a time, on both backends.

    python bench/generation_throughput.py                   # 16 prompts, 64 new tokens: a few minutes on CPU
    python bench/generation_throughput.py --n 8 --max-tokens 32 --backends torch

The quickstart recipe's model (the embedded SmolLM2-135M-Instruct, fp32) and prompts: its eval
split first, then training records when ``--n`` asks for more, each rendered by the chat
template exactly as in training (``data.encode_prompt``). Greedy decoding through
``generate_texts`` (sorted by length, batches of ``--batch-size``; then batches of 1), stopping at
``<|im_end|>`` or ``--max-tokens``. New tokens are the generated ids without the final eos.

Each backend runs in its own process: MLX with Debian's OpenBLAS in ``LD_PRELOAD`` (its bundled
BLAS is ~30x slower), torch without it (torch is slower with it). One untimed warm-up call
first. The table also says whether batched and one-by-one produced the same texts, and the
load average, since the CPU may be shared. On a shared CPU run torch with
``OMP_WAIT_POLICY=PASSIVE`` in the environment (it reaches the worker): otherwise torch's OpenMP
threads spin-wait against the other jobs, and with a load average of 3-5 on 2 cores we measured
batch-8 torch generation 7x slower (0.06 vs 0.41 prompts/s) while MLX was unaffected.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "quickstart.toml"


class Counting:
    """A backend wrapper that counts the new tokens of every ``generate`` call."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.new_tokens = backend, 0

    def generate(self, prompts: list, max_tokens: int, **kw: Any) -> list[list[int]]:
        outs = self.backend.generate(prompts, max_tokens, **kw)
        self.new_tokens += sum(len(o) for o in outs)
        return outs


def measure(name: str, n: int, max_tokens: int, batch_size: int) -> dict[str, Any]:
    """Runs in the worker process: load, warm up, time batched then one-by-one."""
    from mlxtune.data.records import encode_prompt
    from mlxtune.evaluation.generation import GenSettings, generate_texts
    from mlxtune.recipe.loading import load_recipe
    from mlxtune.training.session import load_backend_with_adapter, prepare

    recipe = load_recipe(RECIPE)
    model_dir, tokenizer, data = prepare(recipe)
    records = (data.eval_records + data.train_records)[:n]
    prompts = [encode_prompt(r, recipe.data, tokenizer) for r in records]
    backend = Counting(load_backend_with_adapter(name, model_dir, recipe))
    generate_texts(backend, tokenizer, prompts[:2], GenSettings(max_tokens=4, batch_size=2))
    result: dict[str, Any] = {"backend": name, "prompts": len(prompts), "info": backend.backend.describe(),
                              "prompt_tokens": [int(min(len(p) for p in prompts)), int(max(len(p) for p in prompts))]}
    texts = {}
    for label, bs in (("batched", batch_size), ("one-by-one", 1)):
        backend.new_tokens = 0
        start = time.perf_counter()
        texts[label] = generate_texts(backend, tokenizer, prompts, GenSettings(max_tokens=max_tokens, batch_size=bs))
        seconds = time.perf_counter() - start
        result[label] = {"batch_size": bs, "seconds": seconds, "new_tokens": backend.new_tokens,
                         "prompts_per_s": len(prompts) / seconds, "tokens_per_s": backend.new_tokens / seconds}
    result["same_texts"] = texts["batched"] == texts["one-by-one"]
    result["differing"] = sum(a != b for a, b in zip(texts["batched"], texts["one-by-one"]))
    return result


def run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from mlxtune.system.blas import openblas_path

    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if name == "mlx":
        lib = openblas_path()
        if lib:
            env["LD_PRELOAD"] = lib
    env["MLXTUNE_NO_OPENBLAS"] = "1"  # this script decides the preload itself
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--n", str(args.n),
           "--max-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size)]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{name} worker failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_avg"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def table(results: list[dict[str, Any]], max_tokens: int) -> str:
    rows = ["| backend | mode | prompts | new tokens | seconds | prompts/s | new tokens/s | speed-up | same texts | load avg (start, end) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        one = r["one-by-one"]
        for label in ("batched", "one-by-one"):
            m = r[label]
            mode = f"batch {m['batch_size']}" if label == "batched" else "one by one"
            rows.append(
                f"| {r['backend']} | {mode} | {r['prompts']} | {m['new_tokens']} | {m['seconds']:.1f} | "
                f"{m['prompts_per_s']:.2f} | {m['tokens_per_s']:.1f} | {m['prompts_per_s'] / one['prompts_per_s']:.2f}x | "
                f"{'yes' if r['same_texts'] else 'no (' + str(r['differing']) + ' differ)'} | {r['load_avg'][0]}, {r['load_avg'][1]} |"
            )
    lengths = ", ".join(f"{r['backend']}: prompts {r['prompt_tokens'][0]}-{r['prompt_tokens'][1]} tokens, "
                        + ", ".join(f"{k} {v}" for k, v in r["info"].items() if k in ("device", "dtype", "threads", "blas"))
                        for r in results)
    omp = f"; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if os.environ.get("OMP_WAIT_POLICY") else ""
    return ("\n".join(rows) + f"\n\nGreedy, at most {max_tokens} new tokens per prompt; {lengths}; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{omp}.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="number of prompts (eval split first, then train records)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backends", default="torch,mlx", help="comma-separated: torch, mlx")
    ap.add_argument("--worker", choices=("torch", "mlx"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.n, args.max_tokens, args.batch_size)))
        return
    results = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        print(f"{name}: running ...", file=sys.stderr, flush=True)
        results.append(run_worker(name, args))
    print(table(results, args.max_tokens))


if __name__ == "__main__":
    main()
