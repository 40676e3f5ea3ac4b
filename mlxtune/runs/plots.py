"""Loss curves as PNG (matplotlib, headless): one run for its report, N runs overlaid for compare."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlxtune.files import atomic_file


def _series(events: list[dict[str, Any]], event: str, key: str, adapter: bool = True) -> tuple[list[int], list[float]]:
    pts: dict[int, float] = {}
    for e in events:  # the last entry of a step wins (a resumed run may repeat one)
        if e.get("event") == event and e.get(key) is not None and e.get("adapter", True) == adapter:
            pts[int(e["step"])] = float(e[key])
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def loss_plot(runs: dict[str, list[dict[str, Any]]], path: Path, title: str = "") -> Path | None:
    """Train loss (lines) and eval loss, response-only and full text (markers), per run.

    Returns None without writing when matplotlib is not installed (``pip install 'mlxtune[eval]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    single = len(runs) == 1
    for i, (name, events) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        prefix = "" if single else f"{name}: "
        s, v = _series(events, "train", "loss")
        if s:
            ax.plot(s, v, color=c, lw=1.2, alpha=0.8, label=f"{prefix}train loss")
        s, v = _series(events, "eval", "loss")
        if s:
            ax.plot(s, v, color=c, ls="--", marker="o", ms=4, label=f"{prefix}eval loss (response only)")
        s, v = _series(events, "eval", "loss_full")
        if s:
            ax.plot(s, v, color=c, ls=":", marker="s", ms=4, label=f"{prefix}eval loss (full text)")
        s, v = _series(events, "eval", "loss", adapter=False)
        if s:
            ax.axhline(v[-1], color=c, lw=0.8, alpha=0.5, label=f"{prefix}base model eval loss (response only)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title or ("loss: " + ", ".join(runs)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
