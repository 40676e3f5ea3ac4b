"""`mlxtune compare RUN...`: runs side by side.

Every call prints one markdown table with a row per run (backend, technique, trainable
parameters, final eval losses and perplexity, generation metrics, speed, memory) and can draw
their loss curves overlaid (``--plot``). With exactly two runs it also compares them step by
step, with a verdict. That works for any two run directories (two backends, two machines, two techniques): the per-step
train loss and the eval losses (response-only ``loss`` and full-text ``loss_full``, base model and
adapter) are matched by step, and the largest absolute and relative deviations are reported.
A pair agrees when ``|a - b| <= tol + rtol * |b|`` (numpy's ``isclose`` rule; ``rtol`` is 0 by
default, so ``--tol`` is an absolute tolerance). Without ``--tol`` the tolerance follows how the two
runs compute (:func:`auto_tolerance`): tight for float32 against float32, wider when either side runs
in bf16/fp16 or on a quantized base. Steps present in only one run count as a
difference. Each side is named by its backend and machine (the start event's "backend" and
"machine"; a run from before machines were recorded is an "unknown machine"), so a run directory
copied from another machine compares like a local one: only metrics.jsonl and
recipe.resolved.toml are read, never the paths inside them. Exit code 0 for AGREE, 1 for DIFFER. The command and its tables are
:mod:`mlxtune.cli.compare`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxtune.evaluation.metrics import reduction_pct
from mlxtune.runs.machine import machine_line
from mlxtune.runs.report import fmt_metric, gen_keys, gen_label, markdown_table
from mlxtune.runs.rundir import read_metrics, read_recipe, split_events

EVAL_FIELDS = ("loss", "loss_full")

# The default tolerance by how a run computes (the widest of the two sides wins). Measured with the
# tiny test Llama (tests/conftest.py), 10 steps, lr 1e-2, same seed and data, max |diff| over the
# per-step train losses against the float32 run: torch autocast bf16 1.6e-3, torch model.dtype
# bfloat16 4.0e-3, MLX model.dtype bfloat16 1.4e-3 (MLX bf16 vs torch bf16: 3.1e-3; float32 MLX vs
# torch: 6.5e-6); MLX 8-bit base 3.9e-3, 4-bit base 4.9e-2. Longer runs and bigger models drift
# further, so: bf16/fp16 -> 5e-2 (~12x the largest bf16 difference), quantized base -> 0.25 (~5x
# the 4-bit one). Wider than these is a real difference, not rounding.
TOL_FP32 = 1e-3
TOL_HALF = 5e-2
TOL_QUANTIZED = 0.25
_TOLS = {"fp32": TOL_FP32, "half": TOL_HALF, "quantized": TOL_QUANTIZED}


def _train(events: list[dict[str, Any]]) -> dict[int, float]:
    out = {}
    for e in events:  # the last entry of a step wins (a resumed run may repeat one)
        if e.get("event") == "train" and "loss" in e:
            out[int(e["step"])] = float(e["loss"])
    return out


def _eval(events: list[dict[str, Any]]) -> dict[tuple[int, bool, str], float]:
    out = {}
    for e in events:
        if e.get("event") != "eval":
            continue
        for f in EVAL_FIELDS:
            if f in e and e[f] is not None:
                out[(int(e["step"]), bool(e.get("adapter", True)), f)] = float(e[f])
    return out


def _speed(events: list[dict[str, Any]]) -> dict[str, float | None]:
    train = [e for e in events if e.get("event") == "train"]
    tps = [float(e["tokens_per_s"]) for e in train[1:] or train if "tokens_per_s" in e]  # step 1 includes compilation
    peak = [int(e["peak_memory"]) for e in train if e.get("peak_memory") is not None]
    return {"tokens_per_s": sum(tps) / len(tps) if tps else None, "peak_memory": max(peak) if peak else None}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _recipe(run: Path) -> dict[str, Any] | None:
    recipe = read_recipe(run)
    return None if recipe is None else _flatten(recipe)


def _dev(a: float, b: float) -> tuple[float, float]:
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf, math.inf
    d = abs(a - b)
    return d, d / max(abs(a), abs(b), 1e-12)


def fmt_tol(x: float) -> str:
    """A tolerance as people write it: 1e-3, 5e-2, 2.5e-1."""
    mantissa, exp = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def precision(recipe: dict[str, Any] | None, start: dict[str, Any]) -> tuple[str, str]:
    """(kind, words) of how a run computes: kind "fp32", "half" (bf16/fp16 weights or torch autocast)
    or "quantized"; from its flattened recipe, else its start event's backend info."""
    r, info = recipe or {}, start.get("backend") or {}
    backend = r.get("backend") or info.get("backend")
    bits = int(r.get("model.quantize_bits") or 0) or (4 if r.get("adapter.method") == "qlora" else 0)
    quant = str(info.get("quantization") or "none")
    if bits:
        return "quantized", f"{bits}-bit base"
    if quant != "none":
        return "quantized", "quantized base"
    dtype = str(r.get("model.dtype") or info.get("dtype") or "float32")
    if dtype != "float32":
        return "half", {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    if backend != "mlx" and str(r.get("train.autocast") or info.get("autocast") or "off") != "off":
        return "half", "bf16 autocast"  # the MLX backend ignores train.autocast
    return "fp32", "fp32"


def auto_tolerance(sides: dict[str, tuple[str, str]]) -> tuple[float, str]:
    """(tolerance, why) for two runs' :func:`precision`: the wider side's bound, e.g.
    ``(1e-3, "fp32 vs fp32: 1e-3")`` or ``(5e-2, "bfloat16 on side b: 5e-2")``."""
    tol = max(_TOLS[kind] for kind, _ in sides.values())
    if tol == TOL_FP32:
        return tol, f"fp32 vs fp32: {fmt_tol(tol)}"
    wide = [f"{words} on side {side}" for side, (kind, words) in sides.items() if _TOLS[kind] == tol]
    return tol, f"{', '.join(wide)}: {fmt_tol(tol)}"


def side_line(recipe: dict[str, Any] | None, start: dict[str, Any]) -> str:
    """What ran a run, from its start event: "torch 2.13.0 cpu float32 on Linux x86_64, AMD EPYC, 2 cores"."""
    info = start.get("backend") or {}
    name = str(info.get("backend") or (recipe or {}).get("backend") or "unknown backend")
    words = [name, str(info.get(name) or ""), str(info.get("device") or ""), str(info.get("dtype") or "")]
    if name != "mlx" and info.get("autocast") not in (None, "", "off"):
        words.append(f"autocast {info['autocast']}")
    if info.get("quantization") not in (None, "", "none"):
        words.append(str(info["quantization"]))
    return " ".join(w for w in words if w) + " on " + machine_line(start.get("machine"))


def compare_runs(dir_a: str | Path, dir_b: str | Path, tol: float | None = None, rtol: float = 0.0) -> dict[str, Any]:
    """Compare two run directories' metrics.jsonl.

    Returns ``{"train": [row], "eval": [row], "only_a": [...], "only_b": [...], "max_abs",
    "max_rel", "worst", "agree", "tol", "tol_why", "rtol", "sides", "recipe_diff", "speed"}`` where a
    train row is ``{"step", "a", "b", "abs", "rel", "ok"}`` and an eval row adds ``"adapter"`` and
    ``"field"``; ``sides`` holds each run's :func:`side_line`. ``tol=None``: :func:`auto_tolerance`.
    """
    ev_a, ev_b = read_metrics(Path(dir_a)), read_metrics(Path(dir_b))
    ra, rb = _recipe(Path(dir_a)), _recipe(Path(dir_b))
    sa, sb = split_events(ev_a)[0], split_events(ev_b)[0]
    if tol is None:
        tol, tol_why = auto_tolerance({"a": precision(ra, sa), "b": precision(rb, sb)})
    else:
        tol_why = f"--tol {fmt_tol(tol)}"
    ta, tb = _train(ev_a), _train(ev_b)
    ea, eb = _eval(ev_a), _eval(ev_b)

    def row(a: float, b: float, **extra: Any) -> dict[str, Any]:
        d, r = _dev(a, b)
        return {**extra, "a": a, "b": b, "abs": d, "rel": r, "ok": d <= tol + rtol * abs(b)}

    train = [row(ta[s], tb[s], step=s) for s in sorted(ta.keys() & tb.keys())]
    evals = [row(ea[k], eb[k], step=k[0], adapter=k[1], field=k[2])
             for k in sorted(ea.keys() & eb.keys(), key=lambda k: (k[0], k[1], k[2]))]
    only_a = [f"train step {s}" for s in sorted(ta.keys() - tb.keys())] + [
        f"eval step {k[0]} {'adapter' if k[1] else 'base'} {k[2]}" for k in sorted(ea.keys() - eb.keys())]
    only_b = [f"train step {s}" for s in sorted(tb.keys() - ta.keys())] + [
        f"eval step {k[0]} {'adapter' if k[1] else 'base'} {k[2]}" for k in sorted(eb.keys() - ea.keys())]
    rows = train + evals
    worst = max(rows, key=lambda r: r["abs"], default=None)
    recipe_diff = []
    if ra is not None and rb is not None:
        recipe_diff = [(k, ra.get(k), rb.get(k)) for k in sorted(ra.keys() | rb.keys()) if ra.get(k) != rb.get(k)]
    return {
        "train": train,
        "eval": evals,
        "only_a": only_a,
        "only_b": only_b,
        "max_abs": max((r["abs"] for r in rows), default=math.nan),
        "max_rel": max((r["rel"] for r in rows), default=math.nan),
        "worst": worst,
        "agree": bool(rows) and all(r["ok"] for r in rows) and not only_a and not only_b,
        "tol": tol,
        "tol_why": tol_why,
        "rtol": rtol,
        "sides": {"a": side_line(ra, sa), "b": side_line(rb, sb)},
        "recipe_diff": recipe_diff,
        "speed": {"a": _speed(ev_a), "b": _speed(ev_b)},
    }


def fmt_number(x: float | None, digits: int = 6) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def fmt_memory(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**30:.2f} GiB"


def summary_row(run: Path) -> dict[str, Any]:
    """One run's headline numbers, read back from its directory."""
    events = read_metrics(run)
    recipe = _recipe(run) or {}
    start, base, evals = split_events(events)
    return {"run": run.name or str(run), "backend": recipe.get("backend", "-"), "method": recipe.get("adapter.method", "-"),
            "model": recipe.get("model.path", "-"), "trainable": start.get("trainable_parameters"),
            "final": evals[-1] if evals else {}, "base": base or {}, "speed": _speed(events), "events": events}


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in gen_keys(r["final"]) if k not in keys]
    header = ["run", "backend", "method", "trainable params", "eval loss (response)", "reduction vs base",
              "eval loss (full)", "ppl (full)"] + [gen_label(k) for k in keys] + ["train tokens/s", "peak memory"]
    table = []
    for r in rows:
        f, b = r["final"], r["base"]
        red = f"{reduction_pct(b['loss'], f['loss']):.1f}%" if f.get("loss") is not None and b.get("loss") else "-"
        table.append([r["run"], str(r["backend"]), str(r["method"]), f"{r['trainable']:,}" if r["trainable"] else "-",
                      fmt_metric("loss", f.get("loss")), red, fmt_metric("loss_full", f.get("loss_full")),
                      fmt_metric("ppl_full", f.get("ppl_full"))] + [fmt_metric(k, f.get(k)) for k in keys]
                     + [fmt_number(r["speed"]["tokens_per_s"], 1), fmt_memory(r["speed"]["peak_memory"])])
    return markdown_table(header, table)


def summary_rows(runs: list[Path]) -> list[dict[str, Any]]:
    """:func:`summary_row` of each run; runs with the same folder name are named by their path."""
    rows = [summary_row(Path(r)) for r in runs]
    names = [r["run"] for r in rows]
    if len(set(names)) < len(names):
        for r, path in zip(rows, runs):
            r["run"] = str(path)
    return rows


def pair_names(run_a: str | Path, run_b: str | Path) -> tuple[str, str]:
    """Column names of two compared runs: their folder names, or their paths when those agree."""
    name_a, name_b = Path(run_a).name or str(run_a), Path(run_b).name or str(run_b)
    if name_a == name_b:
        name_a, name_b = str(run_a), str(run_b)
    return name_a, name_b


def verdict(res: dict[str, Any]) -> tuple[int, str, str]:
    """(losses compared, where the largest deviation is, why the runs differ) of a
    :func:`compare_runs` result; ``why`` is "" when they agree or share no step."""
    n = len(res["train"]) + len(res["eval"])
    w = res["worst"]
    where = ""
    if w is not None:
        where = f"train step {w['step']}" if "field" not in w else f"eval step {w['step']} {'adapter' if w['adapter'] else 'base'} {w['field']}"
    bad = sum(not r["ok"] for r in res["train"] + res["eval"])
    missing = len(res["only_a"]) + len(res["only_b"])
    why = ", ".join(x for x in (f"{bad} over tolerance" if bad else "", f"{missing} in one run only" if missing else "") if x)
    return n, where, why


def verdict_text(res: dict[str, Any]) -> str:
    """The verdict line of a :func:`compare_runs` result: "AGREE: ..." or "DIFFER (why): ...", with
    the deviation, where it is, and which tolerance was used and why."""
    n, where, why = verdict(res)
    if n == 0:
        return "DIFFER: the runs have no train or eval step in common"
    summary = (f"{n} losses compared; max |diff| {res['max_abs']:.2e} ({where}), max rel {res['max_rel']:.2e}; "
               f"tolerance {res['tol_why']}" + (f" + {res['rtol']:g} x |b|" if res["rtol"] else " absolute"))
    return f"AGREE: {summary}" if res["agree"] else f"DIFFER ({why}): {summary}"


def pair_markdown(res: dict[str, Any], names: tuple[str, str]) -> str:
    """The two-run part of ``--markdown``: what each side ran on, and the verdict."""
    lines = [f"- a (`{names[0]}`): {res['sides']['a']}", f"- b (`{names[1]}`): {res['sides']['b']}", ""]
    head, _, rest = verdict_text(res).partition(":")
    return "\n".join(lines + [f"**{head}**:{rest}"])
