"""report.md and loss.png of a run directory: the tables the users used to assemble by hand.

Everything is read back from the run directory (``recipe.resolved.toml``, ``metrics.jsonl`` and
``evals.jsonl``), so the report can be rebuilt at any time, e.g. after `mlxtune eval`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mlxtune.evaluation.metrics import LOSS_LABELS, is_better, metric_value, reduction_pct
from mlxtune.runs.rundir import RunDir, read_evals, read_metrics, read_recipe, split_events

# generation metrics: key -> (label, shown as a percentage of 1)
GEN_ROWS = {
    "bleu": ("BLEU", False), "chrf": ("chrF", False),
    "cefr": ("CEFR score (mean of the two below)", True),
    "cefr_word_usage": ("CEFR: target words used in their sentence", True),
    "cefr_level_ok": ("CEFR: words at or below the level", True),
    "solved": ("solved", False),
}


def gen_keys(ev: dict[str, Any]) -> list[str]:
    """Generation-metric keys present in an eval event, in a stable order."""
    passes = sorted((k for k in ev if k.startswith("pass@")), key=lambda k: int(k[5:]))
    return ([k for k in ("bleu", "chrf") if k in ev] + passes + (["solved"] if "solved" in ev else [])
            + [k for k in GEN_ROWS if k.startswith("cefr") and k in ev])


def gen_label(key: str) -> str:
    return GEN_ROWS[key][0] if key in GEN_ROWS else key


def fmt_metric(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, str):
        return value
    if key.startswith("pass@") or GEN_ROWS.get(key, ("", False))[1]:
        return f"{100 * value:.1f}%"
    if key in ("bleu", "chrf"):
        return f"{value:.2f}"
    return f"{value:.4f}"


def comparison_rows(base: dict[str, Any] | None, final: dict[str, Any] | None) -> list[list[str]]:
    """(metric, base, fine-tuned, change) rows: losses with their reduction in percent, labelled
    response-only or full-text; generation metrics with their gain in points."""
    if not final:
        return []
    rows = []
    for key in ("loss", "ppl", "loss_full", "ppl_full"):
        label = LOSS_LABELS[key]
        if key not in final:
            continue
        b = base.get(key) if base else None
        rows.append([label, fmt_metric(key, b), fmt_metric(key, final[key]),
                     f"{reduction_pct(b, final[key]):.1f}% lower" if b is not None else "-"])
    for key in gen_keys(final):
        b = base.get(key) if base else None
        if isinstance(final[key], str):
            rows.append([gen_label(key), fmt_metric(key, b), final[key], "-"])
            continue
        scale = 100.0 if key.startswith(("pass@", "cefr")) else 1.0
        change = f"{scale * (final[key] - b):+.2f} points" if b is not None else "-"
        rows.append([gen_label(key), fmt_metric(key, b), fmt_metric(key, final[key]), change])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _step_epochs(events: list[dict[str, Any]]) -> dict[int, int]:
    return {int(e["step"]): int(e["epoch"]) for e in events if e.get("event") == "train" and "epoch" in e}


def eval_table(evals: list[dict[str, Any]], epochs: dict[int, int], best_step: int | None) -> tuple[list[str], list[list[str]]]:
    keys = gen_keys(evals[-1]) if evals else []
    header = ["step", "epoch", "eval loss (response)", "eval loss (full)", "ppl (full)"] + [gen_label(k) for k in keys]
    rows = []
    for e in evals:
        step = int(e["step"])
        mark = " (best)" if step == best_step else ""
        rows.append([f"{step}{mark}", str(epochs[step] + 1) if step in epochs else "-", fmt_metric("loss", e.get("loss")),
                     fmt_metric("loss_full", e.get("loss_full")), fmt_metric("ppl_full", e.get("ppl_full"))]
                    + [fmt_metric(k, e.get(k)) for k in keys])
    return header, rows


def epoch_rows(events: list[dict[str, Any]], evals: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per epoch: its steps, mean train loss, and the last eval inside it."""
    by_epoch: dict[int, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("event") == "train" and "epoch" in e:
            by_epoch.setdefault(int(e["epoch"]), []).append(e)
    keys = gen_keys(evals[-1]) if evals else []
    header = ["epoch", "steps", "mean train loss", "eval loss (response)", "eval loss (full)"] + [gen_label(k) for k in keys]
    rows = []
    for ep, items in sorted(by_epoch.items()):
        lo, hi = int(items[0]["step"]), int(items[-1]["step"])
        inside = [e for e in evals if lo <= int(e["step"]) <= hi]
        last = inside[-1] if inside else {}
        mean = sum(float(e["loss"]) for e in items) / len(items)
        rows.append([str(ep + 1), f"{lo}-{hi}", f"{mean:.4f}", fmt_metric("loss", last.get("loss")),
                     fmt_metric("loss_full", last.get("loss_full"))] + [fmt_metric(k, last.get(k)) for k in keys])
    return header, rows


def checkpoint_rows(rows: list[dict[str, Any]], best_metric: str) -> tuple[list[str], list[list[str]], str | None]:
    keys = gen_keys(rows[-1]["metrics"]) if rows else []
    header = ["checkpoint", "step", "eval loss (response)", "eval loss (full)", "ppl (full)"] + [gen_label(k) for k in keys]
    best, best_value = None, None
    for r in rows:
        v = metric_value(r["metrics"], best_metric)
        if r["checkpoint"] != "base" and v is not None and is_better(best_metric, v, best_value):
            best, best_value = r["checkpoint"], v
    table = []
    for r in rows:
        m = r["metrics"]
        table.append([r["checkpoint"] + (" (best)" if r["checkpoint"] == best else ""), str(r.get("step", "-")),
                      fmt_metric("loss", m.get("loss")), fmt_metric("loss_full", m.get("loss_full")),
                      fmt_metric("ppl_full", m.get("ppl_full"))] + [fmt_metric(k, m.get(k)) for k in keys])
    return header, table, best


def build_report(run: Path) -> str:
    run = Path(run)
    events = read_metrics(run)
    recipe = read_recipe(run) or {}
    start, base, evals = split_events(events)
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)
    m, a, t, ev = (recipe.get(k, {}) for k in ("model", "adapter", "train", "eval"))
    lines = [f"# mlxtune run: {run.name}", ""]
    if m:
        lines.append(f"- model: `{m.get('path')}` ({m.get('dtype')})")
    if a and a.get("method") in ("prompt", "prefix"):
        from mlxtune.recipe.schema import adapter_label

        lines.append(f"- adapter: {adapter_label(a)}; {start.get('trainable_parameters', 0):,} trainable parameters")
    elif a:
        lines.append(f"- adapter: {a.get('method')} r={a.get('rank')} alpha={a.get('alpha')} dropout={a.get('dropout')} "
                     f"on {', '.join(a.get('target_modules', []))} (layers: {a.get('layers')}); "
                     f"{start.get('trainable_parameters', 0):,} trainable parameters")
    if t:
        steps = end["steps"] if end else "?"
        lines.append(f"- training: {steps} steps, lr {t.get('lr')} {t.get('schedule')}, micro batch {t.get('micro_batch')} "
                     f"x accumulation {t.get('grad_accum')}, seed {t.get('seed')}")
    if start.get("backend"):
        lines.append("- backend: " + ", ".join(f"{k} {v}" for k, v in start["backend"].items()))
    data = start.get("data")
    if data:
        lines.append(f"- data: {data['train']['examples']} train / {data['eval']['examples']} eval examples; "
                     f"{data['train']['overlong']} train and {data['eval']['overlong']} eval over max_seq_len")
    if end:
        lines.append(f"- speed: {end['trained_tokens_per_s']:.1f} trained tokens/s over {end['train_seconds']:.1f} s; "
                     f"peak memory {end['peak_memory'] / 2**30:.2f} GiB")
    else:
        lines.append("- status: not finished (no end event in metrics.jsonl)")

    lines += ["", "## Base vs fine-tuned (whole eval split)", ""]
    rows = comparison_rows(base, evals[-1] if evals else None)
    lines.append(markdown_table(["metric", "base", "fine-tuned", "change"], rows) if rows else "No eval yet.")
    if evals and gen_keys(evals[-1]):
        n = evals[-1].get("generated")
        lines += ["", f"Generation metrics on {n} eval prompt(s) ({'greedy' if not ev.get('temperature') else 'temperature ' + str(ev.get('temperature'))}, "
                  f"at most {ev.get('max_new_tokens')} new tokens); outputs in `generations/`."]
        for key in ("bleu_signature", "chrf_signature"):
            if evals[-1].get(key):
                lines.append(f"sacrebleu {key.split('_')[0]} signature: `{evals[-1][key]}`")
    if end and end.get("best_step") is not None:
        lines += ["", f"Best adapter (`best/`): step {end['best_step']} by {end['best_metric']} = {fmt_metric(end['best_metric'], end['best'])}."]

    epochs = _step_epochs(events)
    if evals:
        header, table = eval_table(evals, epochs, end.get("best_step") if end else None)
        lines += ["", "## Evals during training", "", markdown_table(header, table)]
        header, table = epoch_rows(events, evals)
        if len(table) > 1:
            lines += ["", "## Per epoch", "", markdown_table(header, table)]
    scored = read_evals(run)
    if scored:
        header, table, best = checkpoint_rows(scored, ev.get("best_metric", "eval_loss"))
        lines += ["", "## Checkpoints scored by `mlxtune eval`", "", markdown_table(header, table)]
        if best:
            lines += ["", f"Best by {ev.get('best_metric', 'eval_loss')}: `{best}`."]
    if (run / "loss.png").is_file():
        lines += ["", "## Loss curves", "", "![train and eval loss](loss.png)"]
    return "\n".join(lines) + "\n"


def write_report(run: Path) -> Path:
    """Write ``loss.png`` (when matplotlib is installed) and ``report.md``; returns the report path."""
    from mlxtune.runs.plots import loss_plot

    run = Path(run)
    loss_plot({run.name: read_metrics(run)}, run / "loss.png")
    return RunDir(run).write_report(build_report(run))
