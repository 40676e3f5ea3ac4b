"""`mlxtune compare RUN...`: runs side by side.

Every call prints one markdown table with a row per run (backend, technique, trainable
parameters, final eval losses and perplexity, generation metrics, speed, memory) and can draw
their loss curves overlaid (``--plot``). With exactly two runs it also compares them step by
step, with a verdict. That works for any two run directories (two backends, two machines, two techniques): the per-step
train loss and the eval losses (response-only ``loss`` and full-text ``loss_full``, base model and
adapter) are matched by step, and the largest absolute and relative deviations are reported.
A pair agrees when ``|a - b| <= tol + rtol * |b|`` (numpy's ``isclose`` rule; ``rtol`` is 0 by
default, so ``--tol`` is an absolute tolerance). Steps present in only one run count as a
difference. Exit code 0 for AGREE, 1 for DIFFER. The command and its tables are
:mod:`mlxtune.cli.compare`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxtune.evaluation.metrics import reduction_pct
from mlxtune.runs.report import fmt_metric, gen_keys, gen_label, markdown_table
from mlxtune.runs.rundir import read_metrics, read_recipe, split_events

EVAL_FIELDS = ("loss", "loss_full")


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


def compare_runs(dir_a: str | Path, dir_b: str | Path, tol: float = 1e-3, rtol: float = 0.0) -> dict[str, Any]:
    """Compare two run directories' metrics.jsonl.

    Returns ``{"train": [row], "eval": [row], "only_a": [...], "only_b": [...], "max_abs",
    "max_rel", "worst", "agree", "tol", "rtol", "recipe_diff", "speed"}`` where a train row is
    ``{"step", "a", "b", "abs", "rel", "ok"}`` and an eval row adds ``"adapter"`` and ``"field"``.
    """
    ev_a, ev_b = read_metrics(Path(dir_a)), read_metrics(Path(dir_b))
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
    ra, rb = _recipe(Path(dir_a)), _recipe(Path(dir_b))
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
        "rtol": rtol,
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
