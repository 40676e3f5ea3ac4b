"""The batch plan: which micro batch, accumulation and checkpointing fit a memory budget.

Used by `mlxtune plan` (config.json only: no framework, no weights) and by `mlxtune run` when
``train.micro_batch = "auto"``. The memory model itself is :mod:`mlxtune.planning.memory`.

Under data parallelism every process holds the whole base and its own micro batch, so a plan is
the memory of ONE device; the world size (given by the caller: planning does not read the
launchers, which are training's) only sets the global batch, micro_batch x grad_accum x world size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxtune.errors import MlxtuneError
from mlxtune.units import gib, parse_size
from mlxtune.planning.memory import Estimate, StepSetup, estimate
from mlxtune.recipe.schema import Recipe, allows_checkpointing

BUNDLED = Path(__file__).parents[1] / "model_configs"
LONGEST = 32768  # longest sequence the planner searches
# Plans use this share of the budget: the model's error on the accuracy grid is within about 10%
# (bench/memory_grid.py), and a budget is a limit, not a target.
MARGIN = 0.9


# ---------------------------------------------------------------- where the config comes from


def find_config(spec: str, config_file: str | None = None) -> tuple[dict, str]:
    """(config.json as a dict, where it came from) for a recipe's model, without weights.

    ``config_file`` (``--config``) wins; then a GGUF file's (models/source.gguf_config); a local folder; the embedded model's converted
    folder or its bundled config; a hub id's config.json in the Hugging Face cache; the configs
    bundled with mlxtune (``mlxtune/model_configs``) for the recipes' models."""
    if config_file:
        return _read(Path(config_file)), config_file
    spec = spec.strip()
    if spec.lower().endswith(".gguf") and not Path(spec).expanduser().is_dir():
        from mlxtune.models.source import gguf_config

        return gguf_config(spec)  # the converted folder's config, else the GGUF header's
    if spec.startswith("embedded:"):
        from mlxtune.models.source import cache_dir

        converted = cache_dir() / "models" / "smollm2-135m-instruct" / "config.json"
        path = converted if converted.is_file() else BUNDLED / "smollm2-135m-instruct.json"
        return _read(path), str(path)
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise MlxtuneError(f"{local}: no config.json (a model folder needs one)")
        return _read(local / "config.json"), str(local / "config.json")
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = sorted((hub / f"models--{spec.replace('/', '--')}" / "snapshots").glob("*/config.json"),
                       key=lambda p: p.stat().st_mtime)
    if snapshots:
        return _read(snapshots[-1]), str(snapshots[-1])
    bundled = BUNDLED / f"{spec.replace('/', '--')}.json"
    if bundled.is_file():
        return _read(bundled), f"{bundled.name} (bundled with mlxtune)"
    raise MlxtuneError(
        f"no config.json for {spec!r} on this machine: the planner needs only that file. Download it with "
        f"`hf download {spec} config.json` (it lands in the Hugging Face cache, where plan looks), or pass "
        "`mlxtune plan RECIPE --config path/to/config.json`")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MlxtuneError(f"{path}: cannot read the model config ({e}); give the model's config.json (valid JSON) "
                           "with --config, or a model folder that holds one") from None


# ---------------------------------------------------------------- budget and device


def detect_device(backend: str, requested: str = "auto") -> str:
    """The device a run would use, without importing a framework (nvidia-smi for CUDA)."""
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    if backend == "mlx":
        return "metal" if apple else "cpu"
    if requested != "auto":
        return requested
    if _gpu_memory() is not None:
        return "cuda"
    return "mps" if apple else "cpu"


def _gpu_memory() -> int | None:
    """Total memory of GPU 0 in bytes from nvidia-smi, or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return int(float(out[0]) * 2**20) if out else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


# Share of the device's memory a run may plan for by default: on a Mac the memory is shared with
# the OS and the apps (and Metal's working-set limit is about 2/3 to 3/4 of it); a GPU keeps a
# margin for the allocator's fragmentation.
SHARE = {"metal": 0.7, "mps": 0.7, "cuda": 0.9, "cpu": 0.8}


def default_budget(device: str) -> tuple[int, str]:
    """(bytes, how it was chosen) when neither --budget nor train.memory_budget says."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device == "cuda":
        gpu = _gpu_memory()
        if gpu:
            return int(SHARE["cuda"] * gpu), f"90% of the GPU's {gib(gpu)}"
    if device in ("metal", "mps"):
        return int(SHARE[device] * ram), f"70% of this Mac's {gib(ram)} unified memory"
    return int(SHARE["cpu"] * ram), f"80% of this machine's {gib(ram)} RAM"


def budget_for(recipe: Recipe, device: str, override: str | None = None) -> tuple[int, str]:
    if override:
        return parse_size(override, "--budget"), f"--budget {override}"
    if recipe.train.memory_budget:
        return parse_size(recipe.train.memory_budget, "train.memory_budget"), f"train.memory_budget = {recipe.train.memory_budget}"
    return default_budget(device)


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    backend: str
    device: str
    budget: int
    budget_note: str
    seq_len: int  # longest example (data.max_seq_len): the token budget holds for it
    typical_len: int  # length the micro batch is chosen for (max_seq_len without data)
    effective_batch: int
    micro_batch: int  # 0: nothing fits
    grad_accum: int
    grad_checkpointing: bool
    max_batch_tokens: int  # rows x padded length per forward pass that fits at seq_len
    longest_seq: int  # longest sequence that fits with one row per pass
    estimate: Estimate  # at (micro_batch, typical_len), or at one row when nothing fits
    world_size: int = 1  # processes training together; effective_batch is one device's share
    launcher: str | None = None  # who started them (torchrun, mlx.launch), or None: --world-size
    base_shards: int = 1  # train.shard_base: the base's blocks spread over this many devices

    @property
    def fits(self) -> bool:
        return self.micro_batch > 0

    @property
    def global_batch(self) -> int:
        return self.effective_batch * self.world_size

    def describe(self) -> str:
        """One line for `plan` and `run`: the per-device batch plan and, past one process, the world size."""
        batch = (f"micro_batch {self.micro_batch} x grad_accum {self.grad_accum}, checkpointing "
                 f"{'on' if self.grad_checkpointing else 'off'}, at most {self.max_batch_tokens} tokens a pass; "
                 f"predicted peak {gib(self.estimate.total)} of {gib(self.budget)} ({self.budget_note})")
        if self.world_size == 1:
            return batch
        shards = f" (base blocks sharded {self.base_shards} ways: train.shard_base)" if self.base_shards > 1 else ""
        return (f"world size {self.world_size} ({self.launcher or '--world-size'}): per device{shards}: {batch}; global batch = "
                f"{self.micro_batch} x {self.grad_accum} x {self.world_size} = {self.global_batch} examples per step")

    def train_overrides(self) -> dict[str, Any]:
        return {"micro_batch": self.micro_batch, "grad_accum": self.grad_accum, "effective_batch": 0,
                "grad_checkpointing": self.grad_checkpointing, "max_batch_tokens": self.max_batch_tokens}


def _divisors(n: int) -> list[int]:
    return [m for m in range(n, 0, -1) if n % m == 0]


def make_plan(config: dict, setup: StepSetup, budget: int, effective_batch: int, seq_len: int,
              checkpointing: bool | str = "auto", typical_len: int | None = None, budget_note: str = "",
              where: str = "config.json") -> Plan:
    """The largest micro batch dividing ``effective_batch`` whose predicted peak at
    ``typical_len`` fits ``budget``. Without checkpointing when that reaches
    min(effective_batch, 4) rows a pass or checkpointing gains nothing; else with it. The token
    budget per pass is what fits at ``seq_len``, so longer batches are split, never over budget.
    Everything is planned to MARGIN of the budget."""
    typical = min(typical_len or seq_len, seq_len)

    def fits(ckpt: bool, rows: int, length: int) -> Estimate | None:
        est = estimate(config, dataclasses.replace(setup, grad_checkpointing=ckpt), rows, length,
                       accumulate=effective_batch > rows, where=where)
        return est if est.total <= MARGIN * budget else None

    def best(ckpt: bool) -> int:
        return next((m for m in _divisors(effective_batch) if fits(ckpt, m, typical)), 0)

    options = [False, True] if checkpointing == "auto" else [bool(checkpointing)]
    if not allows_checkpointing(setup.method):
        options = [False]
    found = {c: best(c) for c in options}
    if len(options) == 2:
        plain, ckpt = found[False], found[True]
        use = not (plain and (plain >= min(effective_batch, 4) or plain >= ckpt))
    else:
        use = options[0]
    micro = found[use]
    rows_at_max = next((r for r in range(max(micro, 1) * 4, 0, -1) if fits(use, r, seq_len)), 0)
    longest = _longest(lambda t: fits(use, 1, t) is not None, max(seq_len, LONGEST))
    est = estimate(config, dataclasses.replace(setup, grad_checkpointing=use), max(micro, 1), typical,
                   accumulate=effective_batch > max(micro, 1), where=where)
    if micro and not rows_at_max:
        micro = 0  # fits for typical examples, but not for one max_seq_len example
    return Plan(backend=setup.backend, device=setup.device, budget=budget, budget_note=budget_note, seq_len=seq_len,
                typical_len=typical, effective_batch=effective_batch, micro_batch=micro,
                grad_accum=effective_batch // micro if micro else 0, grad_checkpointing=use,
                max_batch_tokens=rows_at_max * seq_len, longest_seq=longest, estimate=est)


def _longest(ok, upper: int) -> int:
    """Largest t in [0, upper] with ok(t) (ok is monotone), by bisection."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def per_device_batch(recipe: Recipe, world_size: int) -> int:
    """Examples per optimizer step on one of ``world_size`` devices: with ``micro_batch = "auto"``
    the recipe's effective (global) batch is kept, so each device takes effective / world size."""
    t = recipe.train
    if world_size < 1:
        raise MlxtuneError(f"--world-size: {world_size} processes; give 1 or more")
    if t.micro_batch != "auto":
        return t.micro_batch * t.grad_accum  # rows per process as written; the global batch grows with the world
    if t.effective_batch % world_size:
        raise MlxtuneError(f"train.effective_batch: {t.effective_batch} examples per step cannot be split evenly across "
                           f"{world_size} processes; make it a multiple of {world_size} or run another number of processes")
    return t.effective_batch // world_size


def plan_recipe(recipe: Recipe, backend: str, budget: str | None = None, config_file: str | None = None,
                config: dict | None = None, typical_len: int | None = None, world_size: int = 1,
                launcher: str | None = None) -> Plan:
    """The plan of one device for a recipe on ``backend`` ("mlx" or "torch") trained by ``world_size``
    processes (``launcher``: who started them, for the message)."""
    where = "config.json"
    effective = per_device_batch(recipe, world_size)
    if config is None:
        config, where = find_config(recipe.model.path, config_file)
    device = detect_device(backend, recipe.model.device)
    limit, note = budget_for(recipe, device, budget)
    setup = step_setup(recipe, backend, device, world_size)
    plan = make_plan(config, setup, limit, effective, recipe.data.max_seq_len,
                     checkpointing=recipe.train.grad_checkpointing, typical_len=typical_len, budget_note=note, where=where)
    return dataclasses.replace(plan, world_size=world_size, launcher=launcher, base_shards=setup.shard_over)


def step_setup(recipe: Recipe, backend: str, device: str, world_size: int = 1) -> StepSetup:
    """The recipe's step on one device; ``train.shard_base`` on torch spreads the base over the world."""
    setup = StepSetup.from_recipe(recipe, backend, device)
    if recipe.train.shard_base and backend == "torch" and world_size > 1:
        setup = dataclasses.replace(setup, shard_over=world_size)
    return setup


def resolve_auto(recipe: Recipe, backend: str, config: dict, lengths: list[int], world_size: int = 1,
                 launcher: str | None = None) -> tuple[Recipe, Plan | None]:
    """The recipe with ``micro_batch = "auto"`` (and ``grad_checkpointing = "auto"``) resolved
    for the data at hand (the micro batch is chosen for the 90th-percentile example length, the
    token budget for max_seq_len) on each of ``world_size`` devices, keeping the effective batch
    global; other recipes come back with checkpointing "auto" as off."""
    t = recipe.train
    if t.micro_batch != "auto":
        if t.grad_checkpointing == "auto":
            recipe = dataclasses.replace(recipe, train=dataclasses.replace(t, grad_checkpointing=False))
        return recipe, None
    ordered = sorted(lengths)
    typical = ordered[int(0.9 * (len(ordered) - 1))] if ordered else None
    plan = plan_recipe(recipe, backend, config=config, typical_len=typical, world_size=world_size, launcher=launcher)
    if not plan.fits:
        raise MlxtuneError(no_fit_message(plan))
    return dataclasses.replace(recipe, train=dataclasses.replace(t, **plan.train_overrides())), plan


def no_fit_message(plan: Plan) -> str:
    return (f"no batch plan fits {gib(plan.budget)} ({plan.budget_note}): one example of {plan.seq_len} tokens needs "
            f"{gib(plan.estimate.total)} with checkpointing {'on' if plan.grad_checkpointing else 'off'}; "
            + (f"the longest sequence that fits is {plan.longest_seq} tokens: lower data.max_seq_len, " if plan.longest_seq else "")
            + ("set train.grad_checkpointing = true, " if not plan.grad_checkpointing else "")
            + "raise train.memory_budget, or use a smaller or quantized model (mlxtune plan shows the breakdown)")


# ---------------------------------------------------------------- the recipe as written


@dataclass
class AsWritten:
    """The recipe's own micro batch (not "auto") against the budget: `mlxtune plan`'s last word."""

    micro_batch: int
    seq_len: int
    grad_checkpointing: bool
    estimate: Estimate
    fits: bool


def as_written(recipe: Recipe, backend: str, plan: Plan, config: dict) -> AsWritten | None:
    """The predicted peak of the recipe's micro batch at data.max_seq_len; None for ``"auto"``."""
    t = recipe.train
    if t.micro_batch == "auto":
        return None
    setup = step_setup(recipe, backend, plan.device, plan.world_size)
    est = estimate(config, setup, t.micro_batch, recipe.data.max_seq_len, accumulate=t.grad_accum > 1)
    return AsWritten(micro_batch=t.micro_batch, seq_len=recipe.data.max_seq_len, grad_checkpointing=setup.grad_checkpointing,
                     estimate=est, fits=est.total <= plan.budget)
