"""The one training loop. Backends provide the maths of a step; everything else lives here:
schedule, accumulation, eval cadence, checkpoints, best-adapter selection, logging, Ctrl-C."""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

from mlxtune.data.batching import Batch, batches_per_epoch, split_batch, total_steps, train_stream
from mlxtune.errors import MlxtuneError
from mlxtune.recipe.schema import EvalConfig, TrainConfig
from mlxtune.runs.rundir import RunDir

if TYPE_CHECKING:
    from backends import Backend

    from mlxtune.data.records import Example


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


def accumulate_step(backend: Backend, micro: list[Batch], denom: int, lr: float, state: dict[str, Any],
                    cfg: TrainConfig, run: RunDir, step: int) -> float:
    """One optimizer step: the micro batches as forward passes of at most ``state["pass_rows"]``
    rows and ``cfg.max_batch_tokens`` tokens, the update after the last pass; returns the NLL sum.

    When a pass runs out of memory (the backend raises OutOfMemory after discarding the step's
    gradients), the rows per pass are halved, so accumulation doubles over the same examples and
    the result is unchanged; an ``oom_backoff`` event goes to metrics.jsonl, the step is retried,
    and later steps (and a resumed run: the value is in the checkpoint's state) keep the smaller size.
    """
    from mlxtune.errors import OutOfMemory

    while True:
        rows = state.setdefault("pass_rows", cfg.micro_batch)
        passes = [p for b in micro for p in split_batch(b, rows, cfg.max_batch_tokens)]
        try:
            loss_sum = 0.0
            for i, p in enumerate(passes):
                loss_sum += backend.train_step(p.tokens, p.mask, max(denom, 1), update=i == len(passes) - 1, lr=lr)
            return loss_sum
        except OutOfMemory as e:
            widest = max(len(p.tokens) for p in passes)
            if widest <= 1:
                raise MlxtuneError(
                    f"out of memory at step {step} with one example per forward pass ({e}); lower data.max_seq_len, "
                    "set train.grad_checkpointing = true, or use a smaller or quantized model (mlxtune plan shows what fits)") from None
            state["pass_rows"] = widest // 2
            run.log({"event": "oom_backoff", "step": step, "micro_batch": state["pass_rows"],
                     "grad_accum": cfg.grad_accum * math.ceil(cfg.micro_batch / state["pass_rows"]),
                     "error": str(e), "time": time.time()})


def train(backend: Backend, train_examples: list[Example], eval_set: list[Batch], cfg: TrainConfig,
          eval_cfg: EvalConfig, run: RunDir, pad_id: int, resume: bool = False, progress: bool = True,
          score_fn: Callable[[bool, int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train the backend's adapter; returns the summary (base and final eval, best step, speed).

    ``score_fn(adapter, step)`` replaces the loss-only eval when given: it returns the losses
    plus the recipe's generation metrics (see :mod:`mlxtune.evaluation.scoring`), and ``best/`` is
    chosen by any of them (``eval_cfg.best_metric``).
    """
    from mlxtune.evaluation.scoring import metric_value
    from mlxtune.evaluation.metrics import is_better

    if score_fn is None:
        def score_fn(adapter: bool, step: int) -> dict[str, Any]:
            return evaluate(backend, eval_set, adapter=adapter)

    total = total_steps(len(train_examples), cfg.micro_batch, cfg.grad_accum, cfg.epochs, cfg.steps)
    epoch_micro = math.ceil(cfg.epochs * batches_per_epoch(len(train_examples), cfg.micro_batch))
    state: dict[str, Any] = {"step": 0, "total": total, "best": None, "best_step": None, "base": None}
    if resume:
        state = restore_checkpoint(backend, run)
        run.log({"event": "resume", "step": state["step"], "time": time.time()})
    stream = train_stream(train_examples, cfg.micro_batch, cfg.seed, cfg.bucket, pad_id, skip=state["step"] * cfg.grad_accum)
    best_name = eval_cfg.best_metric

    if eval_cfg.before and state["base"] is None and eval_set:
        state["base"] = score_fn(False, 0)
        run.log({"event": "eval", "step": 0, "adapter": False, **state["base"]})

    def run_eval(step: int) -> dict[str, Any]:
        ev = score_fn(True, step)
        run.log({"event": "eval", "step": step, "adapter": True, **ev})
        value = metric_value(ev, best_name)
        if value is not None and is_better(best_name, value, state["best"]):
            state["best"], state["best_step"] = value, step
            with run.atomic_dir("best") as tmp:
                backend.save_adapter(tmp / "adapter")
                (tmp / "state.json").write_text(json.dumps({"step": step, "metric": best_name, "value": value, **ev}, indent=2))
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
            # training by epochs, the last step takes only the micro batches left in the last epoch
            left = cfg.grad_accum if cfg.steps else epoch_micro - step * cfg.grad_accum
            micro = [next(stream) for _ in range(min(cfg.grad_accum, left))]
            denom = sum(b.n_targets for b in micro)
            lr = lr_at(step, total, cfg)
            loss_sum = accumulate_step(backend, micro, denom, lr, state, cfg, run, step + 1)
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
