"""The one training loop. Backends provide the maths of a step; everything else lives here:
schedule, accumulation, eval cadence, checkpoints, best-adapter selection, logging, Ctrl-C."""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from .batching import Batch, total_steps, train_stream
from .errors import MlxtuneError
from .recipe import EvalConfig, TrainConfig
from .rundir import RunDir

if TYPE_CHECKING:
    from backends import Backend

    from .data import Example


class Interrupted(MlxtuneError):
    exit_code = 130


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return cfg.warmup_steps or round(cfg.warmup_ratio * total)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Warmup rises linearly to the peak and reaches it at step ``warmup - 1`` (the first step
    already learns, unlike schedules that start at 0); then cosine or linear decay towards 0
    at step ``total``, or constant.
    """
    warm = warmup_steps(cfg, total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress)


def evaluate(backend: Backend, batches: list[Batch], adapter: bool = True) -> dict[str, float]:
    """Token-weighted loss over the whole eval split, response-only and full text."""
    sums = {"response": 0.0, "full": 0.0}
    counts = {"response": 0, "full": 0}
    for b in batches:
        out = backend.eval_step(b.tokens, {"response": b.mask, "full": b.full_mask}, adapter=adapter)
        for k in sums:
            sums[k] += out[k]
        counts["response"] += int(b.mask.sum())
        counts["full"] += int(b.full_mask.sum())
    loss = sums["response"] / max(1, counts["response"])
    loss_full = sums["full"] / max(1, counts["full"])
    return {
        "loss": loss, "loss_full": loss_full, "tokens": counts["response"], "tokens_full": counts["full"],
        "ppl": math.exp(min(loss, 50.0)), "ppl_full": math.exp(min(loss_full, 50.0)),
    }


@contextmanager
def _graceful_sigint() -> Iterator[dict[str, bool]]:
    """First Ctrl-C asks the loop to stop at the next step boundary; a second one is immediate."""
    flag = {"stop": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def save_checkpoint(backend: Backend, run: RunDir, state: dict[str, Any], keep: int) -> None:
    with run.atomic_dir(f"checkpoints/step-{state['step']:06d}") as tmp:
        backend.save_adapter(tmp / "adapter")
        backend.save_optimizer(tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    run.prune_checkpoints(keep)


def restore_checkpoint(backend: Backend, run: RunDir) -> dict[str, Any]:
    ckpts = run.checkpoints()
    if not ckpts:
        raise MlxtuneError(f"--resume: {run.path} has no checkpoint yet (set train.save_every to write them); use --overwrite to start again")
    _, path = ckpts[-1]
    backend.load_adapter(path / "adapter")
    backend.load_optimizer(path / "optimizer.safetensors")
    state = json.loads((path / "state.json").read_text())
    run.truncate_metrics(state["step"])
    return state


def train(backend: Backend, train_examples: list[Example], eval_set: list[Batch], cfg: TrainConfig,
          eval_cfg: EvalConfig, run: RunDir, pad_id: int, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the backend's adapter; returns the summary (base and final eval, best step, speed)."""
    total = total_steps(len(train_examples), cfg.micro_batch, cfg.grad_accum, cfg.epochs, cfg.steps)
    state: dict[str, Any] = {"step": 0, "total": total, "best": None, "best_step": None, "base": None}
    if resume:
        state = restore_checkpoint(backend, run)
        run.log({"event": "resume", "step": state["step"], "time": time.time()})
    stream = train_stream(train_examples, cfg.micro_batch, cfg.seed, cfg.bucket, pad_id, skip=state["step"] * cfg.grad_accum)
    best_key = "loss" if eval_cfg.best_metric == "eval_loss" else "loss_full"

    if eval_cfg.before and state["base"] is None and eval_set:
        state["base"] = evaluate(backend, eval_set, adapter=False)
        run.log({"event": "eval", "step": 0, "adapter": False, **state["base"]})

    def run_eval(step: int) -> dict[str, float]:
        ev = evaluate(backend, eval_set)
        run.log({"event": "eval", "step": step, "adapter": True, **ev})
        if state["best"] is None or ev[best_key] < state["best"]:
            state["best"], state["best_step"] = ev[best_key], step
            with run.atomic_dir("best") as tmp:
                backend.save_adapter(tmp / "adapter")
                (tmp / "state.json").write_text(json.dumps({"step": step, "metric": eval_cfg.best_metric, "value": ev[best_key], **ev}, indent=2))
        return ev

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), disable=not progress)
    last_eval: dict[str, float] | None = None
    started = time.perf_counter()
    trained_tokens = 0
    with bar, _graceful_sigint() as sigint:
        task = bar.add_task("train", total=total, completed=state["step"], info="")
        for step in range(state["step"], total):
            t0 = time.perf_counter()
            micro = [next(stream) for _ in range(cfg.grad_accum)]
            denom = sum(b.n_targets for b in micro)
            lr = lr_at(step, total, cfg)
            loss_sum = 0.0
            for i, b in enumerate(micro):
                loss_sum += backend.train_step(b.tokens, b.mask, max(denom, 1), update=i == len(micro) - 1, lr=lr)
            dt = time.perf_counter() - t0
            trained_tokens += denom
            loss = loss_sum / max(denom, 1)
            if not math.isfinite(loss):
                raise MlxtuneError(f"train loss became {loss} at step {step + 1}; lower train.lr or check the data (mlxtune data show)")
            state["step"] = step + 1
            if state["step"] % cfg.log_every == 0 or state["step"] == total:
                real_tokens = sum(int(b.full_mask.sum()) + len(b.tokens) for b in micro)  # + the first token of each row
                run.log({
                    "event": "train", "step": state["step"], "epoch": micro[-1].epoch, "loss": loss, "tokens": denom,
                    "lr": lr, "grad_norm": backend.last_grad_norm, "tokens_per_s": denom / dt, "processed_tokens_per_s": real_tokens / dt,
                    "peak_memory": backend.peak_memory(), "elapsed": time.perf_counter() - started,
                })
            if eval_set and ((cfg.eval_every and state["step"] % cfg.eval_every == 0) or state["step"] == total):
                last_eval = run_eval(state["step"])
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
                save_checkpoint(backend, run, state, cfg.keep_checkpoints)
            info = f"loss {loss:.4f}  {denom / dt:,.0f} tok/s"
            if last_eval:
                info += f"  eval {last_eval['loss']:.4f}"
            bar.update(task, advance=1, info=info)
            if sigint["stop"] and state["step"] < total:
                save_checkpoint(backend, run, state, cfg.keep_checkpoints)
                run.log({"event": "interrupted", "step": state["step"], "time": time.time()})
                raise Interrupted(f"interrupted at step {state['step']}/{total}; checkpoint saved in {run.path / 'checkpoints'}; continue with --resume")

    with run.atomic_dir("adapters") as tmp:
        backend.save_adapter(tmp)
    elapsed = time.perf_counter() - started
    summary = {
        "steps": total, "base": state["base"], "final": last_eval, "best_step": state["best_step"],
        "best_metric": eval_cfg.best_metric, "best": state["best"], "train_seconds": elapsed,
        "trained_tokens_per_s": trained_tokens / elapsed if elapsed else 0.0, "peak_memory": backend.peak_memory(),
    }
    run.log({"event": "end", "step": total, **{k: v for k, v in summary.items() if k not in ("base", "final")}})
    return summary
