"""Base vs fine-tuned tables, as the users used to assemble them by hand."""

from __future__ import annotations

from typing import Any


def reduction(base: float, tuned: float) -> float:
    """Reduction in percent relative to the base value (positive = better)."""
    return (base - tuned) / base * 100.0 if base else 0.0


def comparison_rows(base: dict[str, float] | None, final: dict[str, float] | None) -> list[list[str]]:
    """Rows of (metric, base, fine-tuned, reduction %) for both masks, labelled which is which."""
    if not final:
        return []
    rows = []
    for key, label in (("loss", "eval loss (response only)"), ("ppl", "perplexity (response only)"),
                       ("loss_full", "eval loss (full text)"), ("ppl_full", "perplexity (full text)")):
        b = base[key] if base else None
        rows.append([label, f"{b:.4f}" if b is not None else "-", f"{final[key]:.4f}",
                     f"{reduction(b, final[key]):.1f}%" if b is not None else "-"])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_report(name: str, recipe: dict[str, Any], backend: dict[str, str], data: dict[str, Any],
                  summary: dict[str, Any]) -> str:
    a, t = recipe["adapter"], recipe["train"]
    lines = [
        f"# mlxtune run: {name}", "",
        f"- model: `{recipe['model']['path']}` ({recipe['model']['dtype']})",
        f"- adapter: {a['method']} r={a['rank']} alpha={a['alpha']} dropout={a['dropout']} on {', '.join(a['target_modules'])} (layers: {a['layers']})",
        f"- training: {summary['steps']} steps, lr {t['lr']} {t['schedule']}, micro batch {t['micro_batch']} x accumulation {t['grad_accum']}, seed {t['seed']}",
        f"- backend: " + ", ".join(f"{k} {v}" for k, v in backend.items()),
        f"- data: {data['train']['examples']} train / {data['eval']['examples']} eval examples; "
        f"{data['train']['overlong']} train and {data['eval']['overlong']} eval over max_seq_len",
        f"- speed: {summary['trained_tokens_per_s']:.1f} trained tokens/s over {summary['train_seconds']:.1f} s; peak memory {summary['peak_memory'] / 2**30:.2f} GiB",
        "", "## Base vs fine-tuned (whole eval split)", "",
    ]
    rows = comparison_rows(summary["base"], summary["final"])
    lines.append(markdown_table(["metric", "base", "fine-tuned", "reduction"], rows) if rows else "No eval split.")
    if summary.get("best_step") is not None:
        lines += ["", f"Best adapter (`best/`): step {summary['best_step']} by {summary['best_metric']} = {summary['best']:.4f}."]
    return "\n".join(lines) + "\n"
