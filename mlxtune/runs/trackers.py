"""Experiment trackers (recipe key ``output.report_to``): TensorBoard, wandb, trackio.

The loop logs every event through ``RunDir.log`` into metrics.jsonl; :class:`Trackers` listens
there (``RunDir.listeners``) and forwards the train and eval events as scalars, so the loop knows
nothing about trackers and metrics.jsonl stays the one source the trackers mirror. The training
session opens it after the run directory and closes it when the run ends, however it ends.

Scalars: ``train/loss``, ``train/lr``, ``train/grad_norm``; every number of an adapter eval under
``eval/`` (``loss``, ``loss_full``, ``ppl``, ``ppl_full``, ``bleu``, ``chrf``, ``pass@1``,
``cefr`` ...) and of the adapter-off eval before training under ``eval_base/``.

A resumed run appends to the same log. TensorBoard: at the resume step the log gets a restart
marker (``SessionLog.START``), so readers drop the values logged past it by the interrupted run,
as metrics.jsonl does (``RunDir.truncate_metrics``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Protocol

TENSORBOARD_DIR = "tensorboard"  # under the run directory
# counts, not metrics: not worth a chart
_NOT_SCALARS = {"step", "tokens", "tokens_full", "generated"}


def scalars(event: dict[str, Any]) -> dict[str, float]:
    """The tracker scalars of one metrics.jsonl event, by tag ({} for events that have none)."""
    kind = event.get("event")
    if kind == "train":
        values = {f"train/{k}": event.get(k) for k in ("loss", "lr", "grad_norm")}
    elif kind == "eval":
        prefix = "eval/" if event.get("adapter", True) else "eval_base/"
        values = {prefix + k: v for k, v in event.items() if k not in _NOT_SCALARS}
    else:
        return {}
    # bools (and strings such as "solved": "3/4" or a non-finite "nan") are not scalars
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...
    def resume(self, step: int) -> None: ...
    def close(self) -> None: ...


class TensorBoard:
    """Event files under ``<run>/tensorboard/``, written with the tensorboard package's own writer
    (no torch or TensorFlow needed, so both backends write them)."""

    def __init__(self, path: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        path.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(path))

    def _event(self, step: int, **kw: Any) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self.writer.add_event(Event(wall_time=time.time(), step=step, **kw))

    def log(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._event(step, summary=Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()]))
        self.writer.flush()  # a few events a minute at most: a reader sees each as it comes

    def resume(self, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import SessionLog

        # readers purge what the interrupted run logged at steps >= this one
        self._event(step + 1, session_log=SessionLog(status=SessionLog.START))

    def close(self) -> None:
        self.writer.close()


class WandbLike:
    """wandb and trackio (the same init / log / finish calls); their files go under the run."""

    def __init__(self, module_name: str, run_path: Path, name: str, config: dict[str, Any]):
        import importlib

        self.module = importlib.import_module(module_name)
        kw: dict[str, Any] = {"dir": str(run_path)} if module_name == "wandb" else {}
        self.module.init(project="mlxtune", name=name, config=config, **kw)

    def log(self, values: dict[str, float], step: int) -> None:
        self.module.log(values, step=step)

    def resume(self, step: int) -> None:
        pass  # a resumed run is a new wandb / trackio run of the same name, from the resume step on

    def close(self) -> None:
        self.module.finish()


class Trackers:
    """The trackers of ``report_to``, fed by ``RunDir.log``; use as a context manager around the
    training so they are closed (files flushed, remote runs finished) however it ends."""

    def __init__(self, report_to: list[str], run_path: Path, name: str, config: dict[str, Any]):
        self.trackers: list[Tracker] = []
        for kind in report_to:
            if kind == "tensorboard":
                self.trackers.append(TensorBoard(Path(run_path) / TENSORBOARD_DIR))
            else:
                self.trackers.append(WandbLike(kind, Path(run_path), name, config))

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.trackers:
            return
        if event.get("event") == "resume":
            for t in self.trackers:
                t.resume(int(event["step"]))
            return
        values = scalars(event)
        if values:
            for t in self.trackers:
                t.log(values, int(event.get("step", 0)))

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
