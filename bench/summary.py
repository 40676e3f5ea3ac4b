"""Per-variant summaries, mlxtune/raw ratios and the markdown table of a benchmark run."""

from __future__ import annotations

from typing import Any, Callable

# backend -> (raw tool, mlxtune variant, least speed ratio, most memory ratio, memory measure)
PAIRS = {
    "mlx": ("mlx_lm", "mlxtune-mlx", 1.0, 1.0, "peak_framework"),
    "torch": ("trl", "mlxtune-torch", 1.3, 1.0, "peak_framework"),
}
GIB = 2 ** 30


def summarize(steps: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Speed over the steps after the warm-up; losses as the tool reported them."""
    timed = steps[warmup:] or steps
    seconds = sum(s["seconds"] for s in timed)
    trained = sum(s["trained"] for s in timed)
    real = sum(s["real"] for s in timed)
    padded = sum(s["padded"] for s in timed)
    return {
        "timed_steps": len(timed),
        "step_time_s": seconds / len(timed),
        "trained_tok_s": trained / seconds,
        "processed_tok_s": padded / seconds,
        "real_tok_s": real / seconds,
        "padding_share": 1.0 - real / padded,
        "trained_per_step": trained / len(timed),
        "train_loss_last": steps[-1]["loss"],
        "train_loss_mean": sum(s["loss"] for s in timed) / len(timed),
    }


def model_flops(steps: list[dict[str, Any]], warmup: int, rows: int,
                per_position: Callable[[float, float], float]) -> dict[str, Any]:
    """Model FLOPs of the timed steps (``mlxtune/planning/flops.py``, the same count for every
    tool: what a LoRA step must compute, not what a tool happens to compute): each step's padded
    width (padded / ``rows``) and trained share give its FLOPs per processed position."""
    timed = steps[warmup:] or steps
    flops = sum(per_position(s["padded"] / rows, s["trained"] / s["padded"]) * s["padded"] for s in timed)
    padded = sum(s["padded"] for s in timed)
    return {"model_flops_per_pos": flops / padded,
            "achieved_gflop_s": flops / sum(s["seconds"] for s in timed) / 1e9}


def rate_key(name: str, result: dict[str, Any]) -> str:
    """Which measured matmul rate a variant's MFU is taken against: its framework and precision."""
    if name in (PAIRS["mlx"][0], PAIRS["mlx"][1]):
        return "mlx_fp32"
    return "torch_bf16" if result.get("precision_torch") == "bf16" else "torch_fp32"


def mfu_of(name: str, result: dict[str, Any]) -> float | None:
    """Achieved model GFLOP/s over the machine's measured matmul GFLOP/s; None when either is
    missing (results from before issue 18, a framework that did not run)."""
    rate = (result.get("matmul_rate") or {}).get(rate_key(name, result))
    achieved = result["variants"][name].get("achieved_gflop_s")
    return achieved / rate if rate and achieved is not None else None


def ratios(variants: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """mlxtune / raw tool, per backend, for the pairs that both ran."""
    out = {}
    for backend, (raw, ours, min_speed, max_mem, mem_key) in PAIRS.items():
        if raw not in variants or ours not in variants:
            continue
        r, o = variants[raw], variants[ours]
        speed = o["trained_tok_s"] / r["trained_tok_s"]
        memory = o[mem_key] / r[mem_key]
        out[backend] = {
            "raw": raw, "mlxtune": ours,
            "trained_tok_s": speed, "processed_tok_s": o["processed_tok_s"] / r["processed_tok_s"],
            "step_time": o["step_time_s"] / r["step_time_s"],
            "memory": memory, "memory_measure": mem_key, "rss": o["peak_rss_wait4"] / r["peak_rss_wait4"],
            "target_speed": min_speed, "target_memory": max_mem,
            "meets_targets": speed >= min_speed and memory <= max_mem,
        }
    return out


def _gib(v: Any) -> str:
    return f"{v / GIB:.2f}" if isinstance(v, (int, float)) else "-"


def _num(v: Any, fmt: str = ".3f", missing: str = "-") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else missing


def rates_line(result: dict[str, Any]) -> str:
    """The measured matmul rates MFU is taken against, or why there are none."""
    mr = result.get("matmul_rate")
    if not mr:
        return "Matmul rate: n/a (not measured in this run), so no MFU."
    have = [f"{k.replace('_', ' ')} {mr[k]:.1f}" for k in ("torch_fp32", "torch_bf16", "mlx_fp32") if k in mr]
    return (f"Measured matmul rate on the model's shapes ({mr['rows']} rows; GFLOP/s): " + (", ".join(have) or "n/a")
            + ". MFU = achieved model GFLOP/s / the rate of the variant's framework and precision.")


def markdown(result: dict[str, Any]) -> str:
    v = result["variants"]
    lines = [
        f"# mlxtune benchmark, {result['date']}",
        "",
        f"Machine: {result['machine']['cpu']} ({result['machine']['cpus']} CPUs), {result['machine']['platform']}. "
        f"Load: `{result.get('uptime', '')}`.",
        f"Job: {result['job']['train_examples']} train / {result['job']['eval_examples']} eval examples, LoRA r={result['job']['rank']} "
        f"alpha={result['job']['alpha']:g} on {len(result['job']['target_modules'])} projections x {len(result['job']['layers'])} blocks, "
        f"micro batch {result['job']['micro_batch']}, {result['warmup_steps']} warm-up + {result['timed_steps']} timed steps, "
        f"torch precision {result['precision_torch']}. Each variant ran {result.get('rounds', 1)} time(s), the order reversed "
        "every other round; the table shows each variant's fastest round (all rounds in the last column).",
        "",
        rates_line(result),
        "",
        "| variant | trained tok/s | processed tok/s (incl. padding) | padding | step time (s) | peak memory (GiB) | peak RSS (GiB) | train loss (last / mean) | eval loss: own | eval loss: common scorer | load before / after | model GFLOP / processed position | achieved GFLOP/s | MFU | trained tok/s, every round |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in v.items():
        mem = _gib(r.get("peak_framework")) + (" (mx)" if name in ("mlx_lm", "mlxtune-mlx") else "")
        fpp = r.get("model_flops_per_pos")
        flops = (f"| {_num(fpp / 1e9 if fpp else None, '.3g', 'n/a')} | {_num(r.get('achieved_gflop_s'), '.1f', 'n/a')} "
                 f"| {_num(mfu_of(name, result), '.1%', 'n/a')} ")
        lines.append(
            f"| {name} | {r['trained_tok_s']:.1f} | {r['processed_tok_s']:.1f} | {r['padding_share']:.1%} | {r['step_time_s']:.2f} "
            f"| {mem} | {_gib(r['peak_rss_wait4'])} | {r['train_loss_last']:.3f} / {r['train_loss_mean']:.3f} "
            f"| {_num(r.get('eval_loss_own'))} | {_num(r.get('eval_loss_common'))} | {_num(r.get('load_before'), '.1f')} / {_num(r.get('load_after'), '.1f')} "
            f"{flops}| {', '.join(format(x['trained_tok_s'], '.1f') for x in r.get('rounds', []))} |"
        )
    if result.get("ratios"):
        lines += ["", "| backend | mlxtune / raw | trained tok/s | target | peak memory | target | peak RSS | targets met |",
                  "|---|---|---|---|---|---|---|---|"]
        for backend, q in result["ratios"].items():
            lines.append(
                f"| {backend} | {q['mlxtune']} / {q['raw']} | {q['trained_tok_s']:.2f}x | >= {q['target_speed']:.1f}x "
                f"| {q['memory']:.2f}x ({q['memory_measure']}) | <= {q['target_memory']:.1f}x | {q['rss']:.2f}x "
                f"| {'yes' if q['meets_targets'] else 'no'} |"
            )
    for name, why in result.get("skipped", {}).items():
        lines.append(f"\nSkipped {name}: {why}.")
    return "\n".join(lines) + "\n"
