"""The one training loop. Backends provide the maths of a step; everything else lives here:
schedule, accumulation, eval cadence, checkpoints, best-adapter selection, logging, Ctrl-C.

The loop prints nothing: it reports its steps to the :class:`~mlxtune.training.ui.TrainUI` it is
given and writes everything else to the run directory.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from mlxtune.data.batching import Batch, batches_per_epoch, split_batch, total_steps, train_stream
from mlxtune.errors import MlxtuneError, OutOfMemory
from mlxtune.evaluation.metrics import is_better, metric_value
from mlxtune.evaluation.scoring import evaluate
from mlxtune.recipe.schema import EvalConfig, TrainConfig
from mlxtune.runs.rundir import RunDir, read_state
from mlxtune.training.dist import Dist, eval_world, shard
from mlxtune.training.ui import SilentUI, TrainUI

if TYPE_CHECKING:
    from backends import Backend

    from mlxtune.data.records import Example

ScoreFn = Callable[[bool, int], dict[str, Any]]


class Interrupted(MlxtuneError):
    exit_code = 130


@dataclass
class TrainState:
    """What a checkpoint's state.json holds, enough to resume the run where it stopped."""

    step: int = 0  # optimizer steps done
    total: int = 0  # the run's total when it started
    best: float | None = None  # best value of eval.best_metric so far
    best_step: int | None = None
    base: dict[str, Any] | None = None  # the base model's eval (eval.before)
    pass_rows: int | None = None  # rows per forward pass, set at the first step, halved on OOM
    world_size: int = 1  # processes that trained the run (training/dist.py); a resume needs the same

    def to_dict(self) -> dict[str, Any]:
        """The state.json keys (``pass_rows`` once the first step set it)."""
        out = {"step": self.step, "total": self.total, "best": self.best, "best_step": self.best_step, "base": self.base}
        if self.pass_rows is not None:
            out["pass_rows"] = self.pass_rows
        if self.world_size != 1:
            out["world_size"] = self.world_size
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        return cls(step=d["step"], total=d.get("total", 0), best=d.get("best"), best_step=d.get("best_step"),
                   base=d.get("base"), pass_rows=d.get("pass_rows"), world_size=d.get("world_size", 1))


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


def adapter_bytes(backend: Backend) -> int:
    """Bytes of an adapter folder (the disk-full message's estimate of what a save needs): its
    weights twice, as LoRA/DoRA folders hold both PEFT's and mlx-lm's format (adapters/lora.py)."""
    return 2 * sum(int(w.nbytes) for w in backend.get_adapter_weights().values())


def save_checkpoint(backend: Backend, run: RunDir, state: TrainState, keep: int) -> None:
    # the adapter (in two formats) and AdamW's two moments per weight
    with run.checkpoint_dir(state.step, state.to_dict(), need=lambda: 2 * adapter_bytes(backend)) as tmp:
        backend.save_adapter(tmp / "adapter")
        backend.save_optimizer(tmp / "optimizer.safetensors")
    run.prune_checkpoints(keep)


def restore_checkpoint(backend: Backend, run: RunDir, world_size: int = 1) -> TrainState:
    ckpts = run.checkpoints()
    if not ckpts:
        raise MlxtuneError(f"--resume: {run.path} has no checkpoint yet (set train.save_every to write them); use --overwrite to start again")
    _, path = ckpts[-1]
    state = TrainState.from_dict(read_state(path))
    if state.world_size != world_size:
        # a step reads micro_batch x world size rows, so another size would change the data order and the maths
        raise MlxtuneError(f"--resume: {path} was written by a run of {state.world_size} process(es) and this one has {world_size}; "
                           f"resume with the same number of processes (e.g. torchrun --nproc-per-node {state.world_size}, "
                           f"mlx.launch -n {state.world_size}, or no launcher for 1), or --overwrite to start again")
    backend.load_adapter(path / "adapter")
    backend.load_optimizer(path / "optimizer.safetensors")
    run.truncate_metrics(state.step)
    return state


def accumulate_step(backend: Backend, micro: list[Batch], denom: int, lr: float, state: TrainState,
                    cfg: TrainConfig, run: RunDir, step: int, world: int = 1) -> float:
    """One optimizer step: the micro batches as forward passes of at most ``state.pass_rows``
    rows and ``cfg.max_batch_tokens`` tokens, the update after the last pass; returns the NLL sum.

    When a pass runs out of memory (the backend raises OutOfMemory after discarding the step's
    gradients), the rows per pass are halved, so accumulation doubles over the same examples and
    the result is unchanged; an ``oom_backoff`` event goes to metrics.jsonl, the step is retried,
    and later steps (and a resumed run: the value is in the checkpoint's state) keep the smaller size.
    """
    while True:
        if state.pass_rows is None:
            state.pass_rows = cfg.micro_batch
        passes = [p for b in micro for p in split_batch(b, state.pass_rows, cfg.max_batch_tokens)]
        try:
            loss_sum = 0.0
            for i, p in enumerate(passes):
                loss_sum += backend.train_step(p.tokens, p.mask, max(denom, 1), update=i == len(passes) - 1, lr=lr)
            return loss_sum
        except OutOfMemory as e:
            widest = max(len(p.tokens) for p in passes)
            if world > 1:  # the other ranks wait in the step's all-reduce: a retry on one rank alone would hang
                raise MlxtuneError(f"out of memory at step {step} in one of {world} processes ({e}); lower train.micro_batch "
                                   "(or set train.max_batch_tokens / train.grad_checkpointing = true) and start again") from None
            if widest <= 1:
                raise MlxtuneError(
                    f"out of memory at step {step} with one example per forward pass ({e}); lower data.max_seq_len, "
                    "set train.grad_checkpointing = true, or use a smaller or quantized model (mlxtune plan shows what fits)") from None
            state.pass_rows = widest // 2
            run.log({"event": "oom_backoff", "step": step, "micro_batch": state.pass_rows,
                     "grad_accum": cfg.grad_accum * math.ceil(cfg.micro_batch / state.pass_rows),
                     "error": str(e), "time": time.time()})


class _Training:
    """The steps of one :func:`train` call and what they share."""

    def __init__(self, backend: Backend, cfg: TrainConfig, eval_cfg: EvalConfig, run: RunDir, eval_set: list[Batch],
                 score_fn: ScoreFn, ui: TrainUI, total: int, state: TrainState, dist: Dist):
        self.backend, self.cfg, self.eval_cfg, self.run, self.eval_set = backend, cfg, eval_cfg, run, eval_set
        self.score_fn, self.ui, self.total, self.state, self.dist = score_fn, ui, total, state, dist
        self.stop_requested = False
        self.sigint: dict[str, bool] = {"stop": False}
        self.last_eval: dict[str, Any] | None = None
        self.trained_tokens = 0
        self.started = time.perf_counter()

    def run_steps(self, stream: Iterator[Batch], epoch_micro: int) -> None:
        self.started = time.perf_counter()
        self.ui.start(self.total, self.state.step)
        try:
            with _graceful_sigint() as sigint:
                for step in range(self.state.step, self.total):
                    self.sigint = sigint
                    self.one_step(step, stream, epoch_micro)
                    # several processes stop on the flag they all-reduced, so they stop at the same step
                    stop = self.stop_requested if self.dist.size > 1 else sigint["stop"]
                    if stop and self.state.step < self.total:
                        self.interrupt()
        finally:
            self.ui.close()

    def one_step(self, step: int, stream: Iterator[Batch], epoch_micro: int) -> None:
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        # training by epochs, the last step takes only the micro batches left in the last epoch
        left = cfg.grad_accum if cfg.steps else epoch_micro - step * cfg.grad_accum
        micro = [next(stream) for _ in range(min(cfg.grad_accum, left))]
        # global micro batches: every rank reads them whole, so denom is the step's global token count
        denom = sum(b.n_targets for b in micro)
        lr = lr_at(step, self.total, cfg)
        mine = [shard(b, self.dist, int(cfg.micro_batch)) for b in micro]
        loss_sum = accumulate_step(self.backend, mine, denom, lr, state, cfg, self.run, step + 1, self.dist.size)
        if self.dist.size > 1:  # the global loss; a Ctrl-C on any rank stops all of them at the same step
            loss_sum, stops = self.dist.sum([loss_sum, float(self.sigint["stop"])])
            self.stop_requested = stops > 0
        dt = time.perf_counter() - t0
        self.trained_tokens += denom
        loss = loss_sum / max(denom, 1)
        norm = self.backend.last_grad_norm
        finite = math.isfinite(loss) and (norm is None or math.isfinite(norm))
        if not finite:
            self.nonfinite(step + 1, loss, norm)
        state.step = step + 1
        if finite and (state.step % cfg.log_every == 0 or state.step == self.total):
            real_tokens = sum(int(b.full_mask.sum()) + len(b.tokens) for b in micro)  # + the first token of each row
            self.run.log({
                "event": "train", "step": state.step, "epoch": micro[-1].epoch, "loss": loss, "tokens": denom,
                "lr": lr, "grad_norm": self.backend.last_grad_norm, "tokens_per_s": denom / dt, "processed_tokens_per_s": real_tokens / dt,
                "peak_memory": self.backend.peak_memory(), "elapsed": time.perf_counter() - self.started,
            })
        if self.eval_set and ((cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == self.total):
            self.last_eval = self.run_eval(state.step)
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < self.total and self.dist.main:
            save_checkpoint(self.backend, self.run, state, cfg.keep_checkpoints)
        self.ui.step(state.step, loss, denom / dt, self.last_eval["loss"] if self.last_eval else None)

    def nonfinite(self, step: int, loss: float, norm: float | None) -> None:
        """Step ``step`` had a NaN/inf loss or gradient norm, so the backend left the adapter as it
        was: log it, then go on (``train.on_nonfinite = "skip"``) or stop naming the last good
        checkpoint."""
        what = ", ".join(f"{k} {v}" for k, v in (("loss", loss), ("gradient norm", norm)) if v is not None and not math.isfinite(v))
        self.run.log({"event": "nonfinite", "step": step, "loss": _json_number(loss), "grad_norm": _json_number(norm),
                      "action": self.cfg.on_nonfinite, "time": time.time()})
        if self.cfg.on_nonfinite == "skip":
            return
        ckpts = self.run.checkpoints()
        last = f"the last good checkpoint is {ckpts[-1][1]}" if ckpts else "no checkpoint was written yet (train.save_every)"
        raise MlxtuneError(f"train.on_nonfinite = \"stop\": step {step} gave a non-finite {what}, so the adapter was not updated; "
                           f"{last}; lower train.lr or check the data (mlxtune data show), then --resume or run again, "
                           "or set train.on_nonfinite = \"skip\" to skip such steps")

    def run_eval(self, step: int) -> dict[str, Any]:
        """The adapter's eval at ``step``; a new best goes to best/."""
        ev = self.score_fn(True, step)
        self.run.log({"event": "eval", "step": step, "adapter": True, **ev})
        name = self.eval_cfg.best_metric
        value = metric_value(ev, name)
        if value is not None and is_better(name, value, self.state.best):
            self.state.best, self.state.best_step = value, step
            if not self.dist.main:
                return ev
            with self.run.best_dir({"step": step, "metric": name, "value": value, **ev},
                                   need=lambda: adapter_bytes(self.backend)) as tmp:
                self.backend.save_adapter(tmp / "adapter")
        return ev

    def interrupt(self) -> None:
        """Ctrl-C: checkpoint the finished steps and stop."""
        if self.dist.main:
            save_checkpoint(self.backend, self.run, self.state, self.cfg.keep_checkpoints)
        self.run.log({"event": "interrupted", "step": self.state.step, "time": time.time()})
        raise Interrupted(f"interrupted at step {self.state.step}/{self.total}; checkpoint saved in "
                          f"{self.run.path / 'checkpoints'}; continue with --resume")

    def finish(self) -> dict[str, Any]:
        """Save the final adapter, log the end event; returns the summary."""
        if self.dist.main:
            with self.run.final_dir(need=lambda: adapter_bytes(self.backend)) as tmp:
                self.backend.save_adapter(tmp)
        elapsed = time.perf_counter() - self.started
        summary = {
            "steps": self.total, "base": self.state.base, "final": self.last_eval, "best_step": self.state.best_step,
            "best_metric": self.eval_cfg.best_metric, "best": self.state.best, "train_seconds": elapsed,
            "trained_tokens_per_s": self.trained_tokens / elapsed if elapsed else 0.0, "peak_memory": self.backend.peak_memory(),
        }
        self.run.log({"event": "end", "step": self.total, **{k: v for k, v in summary.items() if k not in ("base", "final")}})
        return summary


def _json_number(x: float | None) -> float | str | None:
    """NaN and inf as strings: metrics.jsonl stays strict JSON."""
    return x if x is None or math.isfinite(x) else str(x)


def train(backend: Backend, train_examples: list[Example], eval_set: list[Batch], cfg: TrainConfig,
          eval_cfg: EvalConfig, run: RunDir, pad_id: int, resume: bool = False, ui: TrainUI | None = None,
          score_fn: ScoreFn | None = None, dist: Dist | None = None) -> dict[str, Any]:
    """Train the backend's adapter; returns the summary (base and final eval, best step, speed).

    ``score_fn(adapter, step)`` replaces the loss-only eval when given: it returns the losses
    plus the recipe's generation metrics (see :mod:`mlxtune.evaluation.scoring`), and ``best/`` is
    chosen by any of them (``eval_cfg.best_metric``). Steps are reported to ``ui`` (default:
    none). Under a launcher ``dist`` says this process's rank and the world size
    (:mod:`mlxtune.training.dist`): each step then reads ``micro_batch x size`` rows per micro batch.
    """
    ui = ui or SilentUI()
    dist = dist or Dist()
    rows = int(cfg.micro_batch) * dist.size  # a global micro batch
    if score_fn is None:
        def score_fn(adapter: bool, step: int) -> dict[str, Any]:
            return evaluate(backend, eval_set, adapter=adapter, world=eval_world(dist, cfg.shard_base))

    total = total_steps(len(train_examples), rows, cfg.grad_accum, cfg.epochs, cfg.steps)
    epoch_micro = math.ceil(cfg.epochs * batches_per_epoch(len(train_examples), rows))
    state = TrainState(total=total, world_size=dist.size)
    if resume:
        state = restore_checkpoint(backend, run, dist.size)
        run.log({"event": "resume", "step": state.step, "time": time.time()})
    stream = train_stream(train_examples, rows, cfg.seed, cfg.bucket, pad_id, skip=state.step * cfg.grad_accum)

    if eval_cfg.before and state.base is None and eval_set:
        state.base = score_fn(False, 0)
        run.log({"event": "eval", "step": 0, "adapter": False, **state.base})

    training = _Training(backend, cfg, eval_cfg, run, eval_set, score_fn, ui, total, state, dist)
    training.run_steps(stream, epoch_micro)
    return training.finish()
