"""Baseline (b): the raw ``mlx_lm lora`` command, with a recorder.

    python bench/mlx_lm_lora.py RESULT.json --config lora.yaml    # = mlx_lm lora --config lora.yaml

Runs mlx-lm's own command-line entry point (``mlx_lm.lora.main``: its argument and YAML
parsing, data loading, LoRA conversion, optimizer, compiled training step and evaluation) and
changes nothing in the computation. Two public hooks of mlx-lm's trainer are used to record
what it does: a ``TrainingCallback`` (mlx-lm's per-report dict: step time, trained tokens,
``mx.get_peak_memory``, losses) and a wrapper around its ``iterate_batches`` that notes the
shape and row lengths of each training batch before handing it on. With
``steps_per_report: 1`` every report covers one step.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path


def main(out_path: str, argv: list[str]) -> None:
    import mlx.core as mx
    import mlx_lm.lora as lora_cli
    import numpy as np
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback

    reports: list[dict] = []
    vals: list[dict] = []
    batches: list[dict] = []

    class Recorder(TrainingCallback):
        def __init__(self, inner: TrainingCallback | None) -> None:
            self.inner = inner

        def on_train_loss_report(self, info: dict) -> None:
            reports.append(dict(info))
            if self.inner is not None:
                self.inner.on_train_loss_report(info)

        def on_val_loss_report(self, info: dict) -> None:
            vals.append(dict(info))
            if self.inner is not None:
                self.inner.on_val_loss_report(info)

    def recording_batches(*args, **kwargs):
        for batch, lengths in trainer.iterate_batches(*args, **kwargs):
            if kwargs.get("loop"):  # the training stream (evaluation iterates without loop)
                lens = np.array(lengths)
                batches.append({"padded": int(batch.size), "real": int(lens[:, 1].sum())})
            yield batch, lengths

    original_train = lora_cli.train

    def train(*args, **kwargs):
        kwargs["training_callback"] = Recorder(kwargs.get("training_callback"))
        kwargs["iterate_batches"] = recording_batches
        return original_train(*args, **kwargs)

    lora_cli.train = train
    sys.argv = ["mlx_lm.lora", *argv]
    lora_cli.main()

    steps, done = [], 0
    for r, b in zip(reports, batches):
        trained = int(r["trained_tokens"]) - done
        done = int(r["trained_tokens"])
        steps.append({"seconds": 1.0 / r["iterations_per_second"], "loss": r["train_loss"], "trained": trained, **b})
    Path(out_path).write_text(json.dumps({
        "steps": steps,
        "eval_loss_own": vals[-1]["val_loss"] if vals else None,
        "peak_framework": int(mx.get_peak_memory()),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }, indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/mlx_lm_lora.py RESULT.json [mlx_lm lora arguments...]")
    main(sys.argv[1], sys.argv[2:])
