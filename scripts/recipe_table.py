"""Print the memory and time table of recipes/README.md for every shipped recipe.

Memory comes from mlxtune's planner (`mlxtune plan`) for two machines: a 16 GB Apple-Silicon Mac
(MLX on Metal) and a 24 GB CUDA GPU (torch). Time is an ESTIMATE: training FLOPs divided by an
assumed sustained throughput per machine (constants below), with token counts taken from the
shipped data rendered by the embedded SmolLM2 tokenizer (the recipes' own tokenizers are not on
this machine; for English text they give similar counts).

    python scripts/recipe_table.py            # markdown table on stdout
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlxtune.data.records import build_dataset  # noqa: E402
from mlxtune.models.shape import ModelShape  # noqa: E402
from mlxtune.planning.memory import StepSetup, estimate, planner_shape  # noqa: E402
from mlxtune.units import gib, parse_size  # noqa: E402
from mlxtune.planning.planner import MARGIN, find_config, make_plan  # noqa: E402
from mlxtune.recipe.loading import load_recipe  # noqa: E402

# Sustained training throughput assumed for the time estimate, FLOP/s. An M4-class 10-core GPU
# peaks near 4 TFLOP/s (fp16/bf16); MLX LoRA steps sustain roughly half of it. An RTX 4090 peaks at
# 165 TFLOP/s dense bf16; a LoRA step sustains about 40% of it, and bitsandbytes NF4 about half that
# (the weights are dequantized for every matmul).
MACHINES = {
    "mac16": {"backend": "mlx", "device": "metal", "budget": "16GB", "flops": 2.0e12, "label": "16 GB Mac (MLX)"},
    "gpu24": {"backend": "torch", "device": "cuda", "budget": "24GB", "flops": 66e12, "label": "24 GB GPU (torch)"},
}
NF4_SLOWDOWN = 2.0


def token_counts(recipe) -> tuple[list[int], int]:
    """(example lengths, loss tokens) of one epoch of the recipe's training split."""
    from mlxtune.models.source import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model("embedded:smollm2-135m-instruct"), False)
    data = build_dataset(dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, overlong="truncate")), tok)
    return [len(e) for e in data.train], sum(int(e.loss_mask.sum()) for e in data.train)


def step_flops(shape: ModelShape, checkpointing: bool, tokens: int, targets: int) -> float:
    """Forward (2 x weights) + backward to the inputs (2 x weights; the frozen weights get no
    gradient) + a second forward with checkpointing, per position; the head on loss rows only."""
    body = shape.parameters()["projections"]
    per_token = (4 + (2 if checkpointing else 0)) * body
    return tokens * per_token + targets * 4 * shape.vocab * shape.hidden


def row(path: Path) -> list[str]:
    """The recipe's memory on each machine as a run would plan it: ``micro_batch = "auto"`` is
    planned for the 90th-percentile example (as `mlxtune run` does), a fixed micro batch is
    estimated at the longest example of the data."""
    recipe = load_recipe(path, planning=True)
    config, _ = find_config(recipe.model.path)
    shape = planner_shape(config)
    t = recipe.train
    lengths, targets = token_counts(recipe)
    typical = sorted(lengths)[int(0.9 * (len(lengths) - 1))]
    cells = [f"`{path.name}`", recipe.model.path, recipe.adapter.method]
    for m in MACHINES.values():
        budget = parse_size(m["budget"])
        setup = StepSetup.from_recipe(recipe, m["backend"], m["device"])
        if t.micro_batch == "auto":
            plan = make_plan(config, setup, budget, t.effective_batch, recipe.data.max_seq_len,
                             checkpointing=t.grad_checkpointing, typical_len=typical)
            peak, fits, micro, accum, ckpt = plan.estimate.total, plan.fits, plan.micro_batch, plan.grad_accum, plan.grad_checkpointing
        else:
            ckpt = t.grad_checkpointing is True
            peak = estimate(config, dataclasses.replace(setup, grad_checkpointing=ckpt), t.micro_batch, max(lengths),
                            accumulate=t.grad_accum > 1).total
            fits, micro, accum = peak <= MARGIN * budget, t.micro_batch, t.grad_accum
        if not fits:
            cells.append(f"does not fit ({gib(peak)} at one row)" if t.micro_batch == "auto" else f"does not fit ({gib(peak)})")
            continue
        seconds = t.epochs * step_flops(shape, ckpt, sum(lengths), targets) / m["flops"]
        if m["backend"] == "torch" and setup.quantize_bits:
            seconds *= NF4_SLOWDOWN
        cells.append(f"{gib(peak)} ({micro} x {accum}{', checkpointing' if ckpt else ''}); ~{_duration(seconds)}")
    return cells


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, math.ceil(seconds))} s"
    if seconds < 5400:
        return f"{math.ceil(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def main() -> None:
    head = ["recipe", "model", "method"] + [f"{m['label']}: peak memory (micro x accum); time" for m in MACHINES.values()]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        print("| " + " | ".join(row(path)) + " |")


if __name__ == "__main__":
    main()
