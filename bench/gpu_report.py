"""The markdown of ``bench/gpu_check.py``'s result: one table per part."""

from __future__ import annotations

from typing import Any

MIB = 2**20


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "n/a" if x is None else format(x, spec)


def _check_rows(res: dict) -> list[str]:
    rows = []
    for key in ("bf16_training", "generation", "qlora"):
        r = res.get(key)
        if r is None:
            continue
        verdict = r.get("skipped") and f"skipped: {r['skipped']}" or ("pass" if r.get("ok") else "FAIL")
        detail = ", ".join(f"{x:.3f}" for x in r.get("losses", [])) or repr(r.get("outputs", ""))[:60]
        rows.append(f"| {key} | {verdict} | {detail} |")
    return rows


def _throughput(res: dict) -> list[str]:
    peak = res.get("peak", {})
    lines = [f"Peak: {_fmt(peak.get('peak_flops', 0) / 1e12, '.4g')} TFLOP/s ({peak.get('peak_source', '?')}, {peak.get('device', '?')}); "
             f"measured {peak.get('matmul_dtype', '?')} {peak.get('matmul_n', '?')}^3 matmul: "
             f"{_fmt(peak.get('measured_flops', 0) / 1e12, '.4g')} TFLOP/s", "",
             "| model | micro batch x seq | trained tok/s | processed tok/s | model TFLOP/s | MFU (peak) | MFU (matmul) | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in res.get("models", {}).items():
        lines.append(f"| {name} | {m['micro_batch']} x {m['seq']} | {m['trained_tok_s']:.0f} | {m['processed_tok_s']:.0f} | "
                     f"{m['achieved_flops'] / 1e12:.4g} | {m['mfu']:.1%} | {m['mfu_vs_matmul']:.1%} | {m['peak_memory'] / 2**30:.2f} |")
    return lines


def _memory(res: dict) -> list[str]:
    lines = [f"Model {res.get('model', '?')}, {res.get('dtype', '?')} base, LoRA r16 on 7 projections; "
             "predicted = the planner's step peak (no framework overhead); measured = torch.cuda.max_memory_allocated", "",
             "| micro batch | seq | checkpointing | predicted MiB | measured MiB | predicted / measured |", "|---|---|---|---|---|---|"]
    for pt in res.get("points", []):
        meas = pt["measured"] / MIB if pt["measured"] else None
        lines.append(f"| {pt['micro_batch']} | {pt['seq']} | {'on' if pt['ckpt'] else 'off'} | {pt['predicted'] / MIB:.0f} | "
                     f"{_fmt(meas, '.0f')} | {_fmt(pt['ratio'], '.3f')} |")
    return lines


def _trl(res: dict) -> list[str]:
    if res.get("skipped"):
        return [f"skipped: {res['skipped']}"]
    trl = res.get("trl", {})
    return [f"Model {res.get('model')}, float32 base, precision {res.get('precision')} on both sides", "",
            "| mlxtune trained tok/s | TRL trained tok/s | mlxtune / TRL |", "|---|---|---|",
            f"| {_fmt(res.get('mlxtune', {}).get('trained_tok_s'), '.0f')} | {_fmt(trl.get('trained_tok_s'), '.0f')} | "
            f"{_fmt(res.get('ratio'), '.2f')} |"]


SECTIONS = {"cuda_checks": ("CUDA checks", lambda r: ["| check | result | detail |", "|---|---|---|"] + _check_rows(r)),
            "throughput": ("Throughput and MFU (LoRA r16, bf16 base)", _throughput),
            "memory": ("Planner vs measured peak memory", _memory),
            "trl": ("mlxtune vs stock TRL SFTTrainer + peft", _trl)}


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    lines = [f"# mlxtune GPU check ({result.get('date', '')})", "",
             f"Device: {env.get('gpu', result.get('device'))}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
             f"peft {env.get('peft')}, trl {env.get('trl')}, bitsandbytes {env.get('bitsandbytes')}"
             + ("; tiny shapes (a CPU smoke run, numbers mean nothing)" if result.get("tiny") else ""), "",
             "| part | status | seconds | error |", "|---|---|---|---|"]
    for name, rec in result.get("parts", {}).items():
        err = (rec.get("error") or "").replace("|", "/").replace("\n", " ")[-160:]
        lines.append(f"| {name} | {rec['status']} | {rec['seconds']} | {err} |")
    for name, (title, render) in SECTIONS.items():
        rec = result.get("parts", {}).get(name)
        if rec and rec.get("result"):
            try:
                body = render(rec["result"])
            except (KeyError, TypeError) as e:  # a part stopped half-way: say so, keep the rest
                body = [f"(incomplete result: {type(e).__name__} {e})"]
            lines += ["", f"## {title}", ""] + body
    return "\n".join(lines) + "\n"
