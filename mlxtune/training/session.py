"""`mlxtune run`: recipe -> model -> data -> backend -> loop -> run directory.

The one core module that reaches a backend (``backends.load_backend``). It prints nothing: its
notes go to the :class:`~mlxtune.training.ui.TrainUI` it is given, and the command renders the
summary it returns.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from mlxtune.adapters.lora import init_lora, select_layers
from mlxtune.data.batching import eval_batches
from mlxtune.data.records import Dataset, build_dataset
from mlxtune.errors import MlxtuneError
from mlxtune.models.source import pad_id, source_note
from mlxtune.recipe.schema import Recipe
from mlxtune.runs.report import write_report
from mlxtune.runs.rundir import RunDir, run_lock, split_events
from mlxtune.runs.trackers import Trackers
from mlxtune.training import loop
from mlxtune.training.backend_choice import backend_message, resolve_backend
from mlxtune.training.dist import Dist, FollowerRunDir, Launch, check_launch, detect_launch, eval_world
from mlxtune.training.ui import SilentUI, TrainUI


def prepare(recipe: Recipe) -> tuple[Path, Any, Dataset]:
    """Model folder, tokenizer and tokenized data: everything before a framework is needed."""
    from mlxtune.models.source import load_tokenizer, model_config, resolve_model

    model_dir = resolve_model(recipe.model.path, recipe.model.revision, recipe.model.trust_remote_code)
    model_config(model_dir)  # before the tokenizer, whose loader also reads config.json
    tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    data = build_dataset(recipe, tokenizer)
    return model_dir, tokenizer, data


def plan_batches(recipe: Recipe, backend: str, model_dir: Path, data: Dataset, ui: TrainUI | None = None) -> Recipe:
    """The recipe with ``micro_batch = "auto"`` / ``grad_checkpointing = "auto"`` resolved by the
    memory planner (mlxtune/planning/planner.py) for this data; says what it chose to ``ui``."""
    from mlxtune.models.source import read_config
    from mlxtune.planning.planner import resolve_auto

    launch = detect_launch()  # each process plans its own device and the global batch is kept
    recipe, plan = resolve_auto(recipe, backend, read_config(model_dir), [len(e) for e in data.train],
                                world_size=launch.size or 1, launcher=launch.launcher)
    if plan is not None and ui is not None:
        ui.message(f"memory plan: {plan.describe()}")
    return recipe


def backend_class(name: str) -> str:
    """``module.Class`` of backend ``name`` when it loads on this machine (the doctor's check);
    else load_backend's error (an MlxtuneError whose ``__context__`` is the ImportError)."""
    from backends import load_backend

    backend = load_backend(name)
    return f"{type(backend).__module__}.{type(backend).__name__}"


def backend_problem(name: str, model_dir: Path) -> str | None:
    """Why backend ``name`` refuses the model in ``model_dir``, naming the feature (None: it takes
    it): the same check its ``load`` runs first, for ``validate``, ``plan`` and ``doctor``."""
    from backends import load_backend

    check = getattr(load_backend(name), "model_problem", None)
    return check(model_dir) if check else None


def load_backend_with_adapter(name: str, model_dir: Path, recipe: Recipe, launch: Launch | None = None):
    """The backend with the recipe's adapter in place, initialised from the core's weights. With
    a launcher's ``launch``, the backend joins its process group first (``backend.dist``: a Dist)."""
    from backends import load_backend

    from mlxtune.models.source import check_weights, model_config, read_config

    layers = select_layers(model_config(model_dir)["num_hidden_layers"], recipe.adapter.layers)
    check_weights(model_dir)
    backend = load_backend(name)
    backend.dist = backend.setup_distributed(launch) if launch is not None and launch.launcher else Dist()
    backend.load(model_dir, recipe, layers)
    if recipe.adapter.method in ("prompt", "prefix"):  # virtual tokens: shapes from config.json (mlxtune/adapters/virtual.py)
        from mlxtune.adapters.virtual import initial_weights

        backend.set_adapter_weights(initial_weights(model_dir, read_config(model_dir), recipe))
    else:
        backend.set_adapter_weights(init_lora(backend.adapter_shapes(), recipe.adapter.rank, recipe.train.seed))
    return backend


def load_for_use(recipe: Recipe, backend_name: str, adapter: Path | None) -> tuple[Any, Any, dict[str, Any]]:
    """(backend, tokenizer, config.json) for `generate` and `chat`: the recipe's model with the
    adapter folder ``adapter`` loaded (PEFT or mlx-lm format), or with the recipe's freshly
    initialised adapter when None (the caller then generates with ``adapter=False``)."""
    from mlxtune.models.source import load_tokenizer, model_config, read_config, resolve_model

    model_dir = resolve_model(recipe.model.path, recipe.model.revision, recipe.model.trust_remote_code)
    model_config(model_dir)
    tokenizer = load_tokenizer(model_dir, recipe.model.trust_remote_code)
    backend = load_backend_with_adapter(backend_name, model_dir, recipe)
    if adapter is not None:
        backend.load_adapter(adapter)
    return backend, tokenizer, read_config(model_dir)


def run(recipe: Recipe, backend_name: str | None = None, overwrite: bool = False, resume: bool = False,
        ui: TrainUI | None = None) -> tuple[RunDir, dict[str, Any]]:
    """Train the recipe into its run directory; returns it and the loop's summary (the command
    prints the summary: ``mlxtune.cli.ui.print_summary``). Notes go to ``ui`` (default: none).
    The run directory's lock is held throughout: a second run, resume or eval of it meanwhile is
    refused. Under a launcher (mlxtune/training/dist.py) rank 0 alone takes the lock and writes."""
    launch = detect_launch()
    with run_lock(Path(recipe.output.dir) / recipe.run_name) if launch.rank == 0 else nullcontext():
        return _run_locked(recipe, backend_name, overwrite, resume, ui if launch.rank == 0 else None, launch)


def _run_locked(recipe: Recipe, backend_name: str | None, overwrite: bool, resume: bool,
                ui: TrainUI | None, launch: Launch) -> tuple[RunDir, dict[str, Any]]:
    ui = ui or SilentUI()
    name, note = resolve_backend(backend_name or recipe.backend)
    if note:
        ui.message(backend_message(name, note))
    check_launch(launch, name)
    recipe.check_shard_base(name, launch.size or 1)
    target = Path(recipe.output.dir) / recipe.run_name
    if launch.rank == 0:
        RunDir.check(target, overwrite=overwrite, resume=resume)
    model_dir, tokenizer, data = prepare(recipe)
    stats = {k: s.summary() for k, s in data.stats.items()}
    ui.message(f"data: {stats['train']['examples']} train / {stats['eval']['examples']} eval examples, "
               f"{stats['train']['tokens']:,} train tokens, length {stats['train']['min_len']}-{stats['train']['max_len']}"
               + (f", {stats['train']['overlong'] + stats['eval']['overlong']} over max_seq_len ({recipe.data.overlong})" if stats['train']['overlong'] + stats['eval']['overlong'] else ""))
    recipe = plan_batches(recipe, name, model_dir, data, ui)
    check_steps(len(data.train), recipe)
    backend = load_backend_with_adapter(name, model_dir, recipe, launch)
    backend.setup_optimizer(recipe)
    dist: Dist = backend.dist
    run_dir = RunDir.create(target, overwrite=overwrite, resume=resume) if dist.main else FollowerRunDir(target)
    if dist.size > 1:
        dist.barrier()  # the other ranks read the run directory (--resume) only once rank 0 has set it up
        ui.message(f"data parallel: {dist.launcher}, {dist.size} processes; each micro batch is {recipe.train.micro_batch} x {dist.size} "
                   f"= {int(recipe.train.micro_batch) * dist.size} rows, split across them (rank 0 writes the run directory)")
    info = backend.describe()
    if gguf_note := source_note(model_dir):  # a GGUF base: the weights are its de-quantized ones
        ui.message(f"note: {gguf_note}")
    ui.message("model: " + str(model_dir) + f"; trainable parameters: {backend.trainable_parameters():,}; " + ", ".join(f"{k} {v}" for k, v in info.items()))
    if not resume:
        run_dir.write_recipe(recipe.to_dict() | {"backend": name})
        from mlxtune.runs.machine import machine  # what it ran on, for `mlxtune compare` across machines

        run_dir.log({"event": "start", "step": 0, "backend": info, "machine": machine(), "model_dir": str(model_dir), "data": stats,
                     "trainable_parameters": backend.trainable_parameters()})
    pad = pad_id(tokenizer)
    eval_set = eval_batches(data.eval, recipe.eval.batch_size, pad)
    # output.report_to: the trackers get every event RunDir.log writes, and are closed however the run ends
    with Trackers(recipe.output.report_to if dist.main else [], run_dir.path, recipe.run_name, recipe.to_dict() | {"backend": name}) as trackers:
        run_dir.listeners.append(trackers)
        summary = loop.train(backend, data.train, eval_set, recipe.train, recipe.eval, run_dir, pad, resume=resume,
                             ui=ui, score_fn=make_score_fn(backend, tokenizer, eval_set, data, recipe, run_dir, ui), dist=dist)
    if resume and summary["base"] is None:
        summary["base"] = split_events(run_dir.events())[1]
    if not dist.main:
        return run_dir, summary
    if recipe.eval.show_examples and data.eval_records:
        from mlxtune.evaluation.scoring import side_by_side

        summary["examples"] = side_by_side(backend, tokenizer, data.eval_records, recipe)
        run_dir.write_generations("examples.jsonl", summary["examples"])
    write_report(run_dir.path)
    return run_dir, summary


def check_steps(n_train: int, recipe: Recipe) -> None:
    """Refuse a run by epochs that sees fewer examples than one optimizer step takes (the loop
    would still make one step, on fewer examples than asked): the epochs are too few, or the data
    is smaller than micro_batch x grad_accum. Runs by steps cycle through the data and always train."""
    cfg = recipe.train
    if cfg.steps:
        return
    per_step = int(cfg.micro_batch) * cfg.grad_accum
    if cfg.epochs * n_train < per_step:
        raise MlxtuneError(
            f"train.epochs = {cfg.epochs:g} over {n_train} train examples is {cfg.epochs * n_train:.3g} examples, less than one "
            f"optimizer step of train.micro_batch {cfg.micro_batch} x train.grad_accum {cfg.grad_accum} = {per_step}: the run "
            f"would train zero steps; raise train.epochs to at least {per_step / max(n_train, 1):.3g}, lower micro_batch or "
            "grad_accum, set train.steps, or add data")


def make_score_fn(backend: Any, tokenizer: Any, eval_set: list, data: Dataset, recipe: Recipe, run_dir: RunDir,
                  ui: TrainUI):
    """The loop's eval: losses plus the recipe's generation metrics; outputs go to generations/.
    Under a launcher the eval batches and generations are sharded across the ranks
    (mlxtune/evaluation/scoring.py) and rank 0 writes what one process would."""
    from mlxtune.evaluation.scoring import generation_records, score

    world = eval_world(getattr(backend, "dist", None) or Dist(), recipe.train.shard_base)
    if world.size > 1 and recipe.eval.metrics and data.eval_records:
        ui.message(f"eval: {world.size} processes share the eval batches and the generation of "
                   f"{len(generation_records(data.eval_records, recipe))} records; progress shows rank 0's share")

    def score_fn(adapter: bool, step: int) -> dict[str, Any]:
        # only the eval before training shows generation progress: the training bar is live after it
        ev, rows = score(backend, tokenizer, eval_set, data.eval_records, recipe, adapter=adapter,
                         progress=ui.generation() if step == 0 else None, world=world)
        if rows:
            run_dir.write_generations("base.jsonl" if not adapter else f"step-{step:06d}.jsonl", rows)
        return ev

    return score_fn


def mask_preview(tokens: np.ndarray, mask: np.ndarray, tokenizer: Any) -> list[tuple[str, bool]]:
    """Decoded text in runs of trained / untrained tokens, for `mlxtune data show`."""
    runs: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or mask[i] != mask[start]:
            runs.append((tokenizer.decode(tokens[start:i].tolist()), bool(mask[start])))
            start = i
    return runs
