"""`mlxtune compare RUN...`: runs side by side.

Every call prints one markdown table with a row per run (backend, technique, trainable
parameters, final eval losses and perplexity, generation metrics, speed, memory) and can draw
their loss curves overlaid (``--plot``). With exactly two runs it also compares them step by
step, with a verdict. That works for any two run directories (two backends, two machines, two techniques): the per-step
train loss and the eval losses (response-only ``loss`` and full-text ``loss_full``, base model and
adapter) are matched by step, and the largest absolute and relative deviations are reported.
A pair agrees when ``|a - b| <= tol + rtol * |b|`` (numpy's ``isclose`` rule; ``rtol`` is 0 by
default, so ``--tol`` is an absolute tolerance). Steps present in only one run count as a
difference. Exit code 0 for AGREE, 1 for DIFFER.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import click

from mlxtune.errors import MlxtuneError
from mlxtune.runs.rundir import read_metrics, split_events

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
    p = Path(run) / "recipe.resolved.toml"
    try:
        return _flatten(tomllib.loads(p.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError):
        return None


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


def _fmt(x: float | None, digits: int = 6) -> str:
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}f}"


def _mem(x: float | None) -> str:
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
    from mlxtune.evaluation.metrics import reduction_pct
    from mlxtune.runs.report import fmt_metric, gen_keys, gen_label, markdown_table

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
                     + [_fmt(r["speed"]["tokens_per_s"], 1), _mem(r["speed"]["peak_memory"])])
    return markdown_table(header, table)


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--tol", default=1e-3, show_default=True, type=float, help="Two runs: absolute tolerance on every loss.")
@click.option("--rtol", default=0.0, show_default=True, type=float, help="Two runs: relative tolerance, added as tol + rtol * |b|.")
@click.option("--all", "show_all", is_flag=True, help="Two runs: print every train step (default: the first and last 20 when there are more than 50).")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write the runs' loss curves overlaid to this PNG.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False), default=None, help="Also write the summary table to this file.")
def compare_cmd(runs: tuple[str, ...], tol: float, rtol: float, show_all: bool, plot: str | None, markdown_path: str | None) -> None:
    """Compare runs: one summary table (and --plot for overlaid loss curves). With exactly two
    runs, also step by step: train loss, eval losses, max deviation and a verdict (exit code 0
    when they AGREE within the tolerance, 1 when they DIFFER)."""
    rows = [summary_row(Path(r)) for r in runs]
    names = [r["run"] for r in rows]
    if len(set(names)) < len(names):
        for r, path in zip(rows, runs):
            r["run"] = str(path)
    table = summary_markdown(rows)
    click.echo(table)
    if markdown_path:
        Path(markdown_path).write_text(table + "\n", encoding="utf-8")
    if plot:
        from mlxtune.runs.plots import loss_plot

        if loss_plot({r["run"]: r["events"] for r in rows}, Path(plot)) is None:
            raise MlxtuneError("--plot needs matplotlib: pip install 'mlxtune[eval]'")
        click.echo(f"plot: {plot}")
    if len(runs) == 2:
        _compare_two(runs[0], runs[1], tol, rtol, show_all)


def _compare_two(run_a: str, run_b: str, tol: float, rtol: float, show_all: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    if tol < 0 or rtol < 0:
        raise MlxtuneError("--tol and --rtol must be >= 0")
    res = compare_runs(run_a, run_b, tol=tol, rtol=rtol)
    console = Console()
    name_a, name_b = Path(run_a).name or run_a, Path(run_b).name or run_b
    if name_a == name_b:
        name_a, name_b = str(run_a), str(run_b)

    if res["recipe_diff"]:
        t = Table(title="recipe differences (recipe.resolved.toml)")
        for col in ("key", name_a, name_b):
            t.add_column(col)
        for k, a, b in res["recipe_diff"]:
            t.add_row(k, repr(a) if a is not None else "-", repr(b) if b is not None else "-")
        console.print(t)

    rows = res["train"]
    if rows:
        t = Table(title="train loss per step")
        for col in ("step", name_a, name_b, "|diff|", "rel"):
            t.add_column(col, justify="right")
        shown = rows if show_all or len(rows) <= 50 else rows[:20] + [None] + rows[-20:]
        for r in shown:
            if r is None:
                t.add_row("...", f"({len(rows) - 40} more; --all)", "", "", "")
                continue
            style = None if r["ok"] else "bold red"
            t.add_row(str(r["step"]), _fmt(r["a"]), _fmt(r["b"]), f"{r['abs']:.2e}", f"{r['rel']:.2e}", style=style)
        console.print(t)
    if res["eval"]:
        t = Table(title="eval loss (loss = response only, loss_full = full text)")
        for col in ("step", "model", "metric", name_a, name_b, "|diff|", "rel"):
            t.add_column(col, justify="right")
        for r in res["eval"]:
            t.add_row(str(r["step"]), "adapter" if r["adapter"] else "base", r["field"], _fmt(r["a"]), _fmt(r["b"]),
                      f"{r['abs']:.2e}", f"{r['rel']:.2e}", style=None if r["ok"] else "bold red")
        console.print(t)

    sa, sb = res["speed"]["a"], res["speed"]["b"]
    if any(v is not None for v in (*sa.values(), *sb.values())):
        t = Table(title="speed and memory (as logged by each run)")
        for col in ("", name_a, name_b):
            t.add_column(col, justify="right")
        t.add_row("train tokens/s (mean, after step 1)", _fmt(sa["tokens_per_s"], 1), _fmt(sb["tokens_per_s"], 1))
        t.add_row("peak memory", _mem(sa["peak_memory"]), _mem(sb["peak_memory"]))
        console.print(t)

    for label, items in ((name_a, res["only_a"]), (name_b, res["only_b"])):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            console.print(f"[yellow]only in {label}:[/] " + ", ".join(items[:5]) + more)
    n = len(res["train"]) + len(res["eval"])
    if n == 0:
        console.print("[bold red]DIFFER[/]: the runs have no train or eval step in common")
        click.get_current_context().exit(1)
    w = res["worst"]
    where = f"train step {w['step']}" if "field" not in w else f"eval step {w['step']} {'adapter' if w['adapter'] else 'base'} {w['field']}"
    summary = (f"{n} losses compared; max |diff| {res['max_abs']:.2e} ({where}), max rel {res['max_rel']:.2e}; "
               f"tolerance {tol:g}" + (f" + {rtol:g} x |b|" if rtol else " absolute"))
    if res["agree"]:
        console.print(f"[bold green]AGREE[/]: {summary}")
        return
    bad = sum(not r["ok"] for r in res["train"] + res["eval"])
    missing = len(res["only_a"]) + len(res["only_b"])
    why = ", ".join(x for x in (f"{bad} over tolerance" if bad else "", f"{missing} in one run only" if missing else "") if x)
    console.print(f"[bold red]DIFFER[/] ({why}): {summary}")
    click.get_current_context().exit(1)
