"""Measured matmul rate of this machine on a model's own shapes: the denominator of MFU.

    python bench/matmul_rate.py CONFIG.json ROWS torch OUT.json   # torch fp32 and bf16
    python bench/matmul_rate.py CONFIG.json ROWS mlx OUT.json     # MLX fp32 (start it with OpenBLAS preloaded)

A datasheet peak means little on a CPU (it depends on the BLAS, the threads, the cache), so MFU
is taken against what a plain matmul of the same shapes reaches here: ``[rows, in]`` times a
weight stored as the model stores it, ``[out, in]`` (``F.linear``; ``x @ w.T`` in MLX, as
``nn.Linear`` computes it: on a CPU without BF16 instructions torch's bf16 ``a @ b`` with
``b`` as ``[in, out]`` measured ~10x slower than the same product in the model's layout),
for each projection of a block and for the head, warm-up first, the median of the repeats per
shape (up to 5, fewer past 2 s), and one rate for the whole model: total FLOPs / total time, each shape weighted by how
often a forward pass runs it (every projection once per block, the head once). A matmul of
``m x k`` by ``k x n`` counts ``2 m k n`` FLOPs, as in ``mlxtune/planning/flops.py``.

:func:`measure` runs each framework in a fresh process (the harness passes the environment:
OpenBLAS preloaded for MLX, never for torch) and returns GFLOP/s per precision.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPEATS = 5
BUDGET_S = 2.0  # per shape: fewer repeats once this much time is spent (a big head on a slow CPU)


def model_shapes(cfg: dict[str, Any], rows: int) -> list[tuple[str, int, int, int, int]]:
    """(name, rows, in, out, uses per forward pass) of every distinct matmul of the model."""
    from mlxtune.planning.memory import planner_shape

    shape = planner_shape(cfg)
    out = [(name, rows, i, o, shape.layers) for name, (i, o) in shape.linears().items()]
    return out + [("head", rows, shape.hidden, shape.vocab, 1)]


def aggregate(times: dict[str, float], shapes: list[tuple[str, int, int, int, int]]) -> float:
    """GFLOP/s of the whole set: FLOPs over time, each shape weighted by its uses."""
    flops = sum(2.0 * m * k * n * uses for _, m, k, n, uses in shapes)
    seconds = sum(times[name] * uses for name, *_, uses in shapes)
    return flops / seconds / 1e9


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: allocation, BLAS thread start, kernel choice
    ts: list[float] = []
    while len(ts) < repeats and (not ts or sum(ts) < BUDGET_S):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def torch_rates(shapes: list, repeats: int = REPEATS) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = {}
    for key, dtype in (("torch_fp32", torch.float32), ("torch_bf16", torch.bfloat16)):
        times = {}
        for name, m, k, n, _ in shapes:
            a, w = (torch.randn(m, k, dtype=dtype, device="cuda" if cuda else "cpu"),
                    torch.randn(n, k, dtype=dtype, device="cuda" if cuda else "cpu"))
            times[name] = _time(lambda a=a, w=w: (F.linear(a, w), sync()), repeats)
        out[key] = aggregate(times, shapes)
    return out


def mlx_rates(shapes: list, repeats: int = REPEATS) -> dict[str, float]:
    import mlx.core as mx

    times = {}
    for name, m, k, n, _ in shapes:
        a, w = mx.random.normal((m, k)), mx.random.normal((n, k))
        mx.eval(a, w)
        times[name] = _time(lambda a=a, w=w: mx.eval(a @ w.T), repeats)
    return {"mlx_fp32": aggregate(times, shapes)}


def measure(cfg_path: Path, rows: int, work: Path, env: Callable[[bool], dict[str, str]],
            frameworks: tuple[str, ...] = ("torch", "mlx")) -> dict[str, Any]:
    """GFLOP/s per precision, one fresh process per framework; a framework that fails (not
    installed) is left out with its error, so the tables show "n/a" for it."""
    result: dict[str, Any] = {"rows": rows, "repeats": REPEATS, "errors": {}}
    for fw in frameworks:
        out = work / f"matmul_rate_{fw}.json"
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(cfg_path), str(rows), fw, str(out)],
                              env=env(fw == "mlx"), capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            result["errors"][fw] = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            continue
        result.update(json.loads(out.read_text()))
    return result


def main(argv: list[str]) -> int:
    cfg_path, rows, fw, out = argv
    shapes = model_shapes(json.loads(Path(cfg_path).read_text()), int(rows))
    if fw not in ("torch", "mlx"):
        sys.exit(f"unknown framework {fw!r}: torch or mlx")
    rates = torch_rates(shapes) if fw == "torch" else mlx_rates(shapes)
    Path(out).write_text(json.dumps(rates))
    print(json.dumps(rates))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
