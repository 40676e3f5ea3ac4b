"""Data parallelism under a launcher: what the environment says, and the :class:`Dist` the loop uses.

The launchers start the processes; mlxtune only reads what they set: ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK`` (torchrun, ``accelerate launch``, multi-node included) for the torch backend, and
``MLX_RANK`` (``mlx.launch``; the size is ``mx.distributed.init()``'s) for the MLX backend. A
launcher environment is never ignored: a backend that cannot use it is refused.

The maths: each optimizer step's micro batches are read as *global* micro batches of
``micro_batch x world size`` rows (the same data order as one process with that micro batch),
and rank r trains rows ``[r*m, (r+1)*m)`` of each; every rank reads the whole global batch, so
the step's denominator (its target-token count) is the global one on every rank without
communication; gradients are summed across ranks before clipping and AdamW; the logged loss is
the all-reduced NLL sum over that denominator. Rank 0 alone writes the run directory
(:class:`FollowerRunDir` for the others). The eval is sharded as well (mlxtune/evaluation/scoring.py):
per-batch loss sums are all-summed and :func:`gather_texts` brings the generated texts together.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxtune.data.batching import Batch
from mlxtune.errors import MlxtuneError
from mlxtune.runs.rundir import RunDir

TORCHRUN, MLX_LAUNCH = "torchrun", "mlx.launch"
LAUNCHER_BACKEND = {TORCHRUN: "torch", MLX_LAUNCH: "mlx"}


@dataclass(frozen=True)
class Launch:
    """The launcher environment of this process (``launcher`` None: started by hand)."""

    launcher: str | None = None
    rank: int = 0
    size: int | None = 1  # None: only the framework knows (mlx.launch)
    local_rank: int = 0

    def describe(self) -> str:
        if self.launcher is None:
            return "single process (no WORLD_SIZE/RANK or MLX_RANK in the environment)"
        size = "?" if self.size is None else str(self.size)
        return f"{self.launcher}: rank {self.rank} of {size} (local rank {self.local_rank})"


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise MlxtuneError(f"environment: {key}={env[key]!r} is not an integer; unset it or start the run with its launcher") from None


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """The launcher environment: torchrun/accelerate's WORLD_SIZE, RANK, LOCAL_RANK, or mlx.launch's MLX_RANK."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and _int(env, "WORLD_SIZE") > 1:
        return Launch(TORCHRUN, _int(env, "RANK") if "RANK" in env else 0, _int(env, "WORLD_SIZE"),
                      _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0)
    if "MLX_RANK" in env:
        return Launch(MLX_LAUNCH, _int(env, "MLX_RANK"), _int(env, "MLX_WORLD_SIZE") if "MLX_WORLD_SIZE" in env else _ring_size(env))
    return Launch()


def _ring_size(env: Mapping[str, str]) -> int | None:
    """mlx.launch's ring backend sets no MLX_WORLD_SIZE, but its MLX_HOSTFILE lists one entry per
    rank (the planner needs the size before MLX starts); None when it does not say."""
    import json

    try:
        hosts = json.loads(Path(env["MLX_HOSTFILE"]).read_text(encoding="utf-8"))
    except (KeyError, OSError, ValueError):
        return None
    return len(hosts) if isinstance(hosts, list) and len(hosts) > 1 else None


def check_launch(launch: Launch, backend: str) -> None:
    """Refuse a backend that cannot use the launcher's processes (they would train alone, each)."""
    wanted = LAUNCHER_BACKEND.get(launch.launcher or "")
    if wanted is None or wanted == backend:
        return
    how = ("mlx.launch -n N --backend ring -- python -m mlxtune run R --backend mlx (the `--` keeps mlx.launch from taking --backend; or set backend = \"mlx\" in the recipe)"
           if wanted == "mlx" else "torchrun --nproc-per-node N -m mlxtune run R --backend torch")
    raise MlxtuneError(f"backend: this process was started by {launch.describe()}, which only the {wanted} backend can use, "
                       f"but the run's backend is {backend}; start it as `{how}`")


@dataclass
class Dist:
    """The world the loop trains in: its rank, size, and a sum of a few floats across ranks."""

    rank: int = 0
    size: int = 1
    all_sum: Callable[[list[float]], list[float]] | None = field(default=None, repr=False)
    launcher: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        if self.size == 1 or self.all_sum is None:
            return list(values)
        return list(self.all_sum(list(values)))

    def barrier(self) -> None:
        self.sum([0.0])

    def gather_texts(self, mine: Mapping[int, str], n: int) -> list[str]:
        """:func:`gather_texts` of this world (the sharded eval's way to collect generations)."""
        return gather_texts(self, mine, n)


def eval_world(dist: Dist, shard_base: bool) -> Dist:
    """The world the eval is sharded over: ``dist``, or a single process's with ``train.shard_base``
    (FSDP2's all-gathers need every rank to run the same forward passes: each rank evaluates all)."""
    return Dist() if shard_base else dist


def gather_texts(dist: Dist, mine: Mapping[int, str], n: int) -> list[str]:
    """Texts ``0..n-1``, each held by one rank (``mine``: this rank's, by index), on every rank,
    with nothing but :meth:`Dist.sum`: the UTF-8 byte lengths are summed first (every index is
    someone's, the others add 0), then each rank writes its bytes at their offsets in one
    zero-filled buffer and the buffers are summed. Bytes <= 255 and lengths are exact in the
    backends' float64 sums. An index no rank holds comes back as ""."""
    if dist.size == 1 or dist.all_sum is None:
        return [mine.get(i, "") for i in range(n)]
    if any(not 0 <= i < n for i in mine):
        raise ValueError(f"gather_texts: indices {sorted(i for i in mine if not 0 <= i < n)} are outside 0..{n - 1}")
    data = {i: t.encode("utf-8") for i, t in mine.items()}
    lengths = np.zeros(n, dtype=np.float64)
    for i, b in data.items():
        lengths[i] = len(b)
    sizes = np.rint(np.asarray(dist.sum(lengths.tolist()), dtype=np.float64)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if offsets[-1] == 0:
        return [""] * n
    buf = np.zeros(int(offsets[-1]), dtype=np.float64)
    for i, b in data.items():
        buf[offsets[i]:offsets[i + 1]] = np.frombuffer(b, dtype=np.uint8)
    summed = np.rint(np.asarray(dist.sum(buf.tolist()), dtype=np.float64)).astype(np.uint8).tobytes()
    return [summed[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]


def shard(batch: Batch, dist: Dist, rows: int) -> Batch:
    """Rank ``dist.rank``'s rows ``[rank*rows, (rank+1)*rows)`` of a global micro batch. A rank left
    without rows (a short last batch) gets one row with no targets: it then adds zero loss and
    zero gradient, but still takes part in the step's all-reduce."""
    if dist.size == 1:
        return batch
    lo = dist.rank * rows
    if lo >= len(batch.tokens):
        return Batch(batch.tokens[:1], np.zeros_like(batch.mask[:1]), np.zeros_like(batch.full_mask[:1]), batch.epoch)
    sl = slice(lo, lo + rows)
    return Batch(batch.tokens[sl], batch.mask[sl], batch.full_mask[sl], batch.epoch)


class FollowerRunDir(RunDir):
    """The run directory as ranks other than 0 see it: read (checkpoints to resume from), never
    written. Weight folders go to a scratch folder that is deleted at once."""

    def write_text(self, name: str, text: str) -> Path:
        return self.path / name

    def log(self, event: dict[str, Any]) -> None:
        return None

    def truncate_metrics(self, after_step: int) -> None:
        return None

    def append_eval(self, row: dict[str, Any]) -> None:
        return None

    def write_generations(self, name: str, rows: list[dict[str, Any]]) -> Path:
        return self.path / name

    def prune_checkpoints(self, keep: int) -> None:
        return None

    def recover(self) -> None:
        return None

    @contextmanager
    def atomic_dir(self, rel: str, need: Callable[[], int] | None = None) -> Iterator[Path]:
        import shutil
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="mlxtune-rank-"))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
