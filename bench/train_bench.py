"""mlxtune against the raw tools a user would otherwise run: one command, four variants, ratios.

    python bench/train_bench.py                                # CPU, embedded SmolLM2-135M: ~11 minutes
    python bench/train_bench.py --steps 3 --warmup 1 --rounds 1   # a quick look

One mlxtune recipe (``bench/bench.toml``) is turned into the configuration of each variant, so
model, data split, LoRA rank/alpha/targets/layers, sequence limit, micro batch, steps and
optimizer settings are the same by construction:

  mlxtune-mlx    ``mlxtune run --backend mlx``  (a)
  mlx_lm         ``mlx_lm lora`` with the same data as chat jsonl and a config file  (b)
  mlxtune-torch  ``mlxtune run --backend torch``  (c)
  trl            a plain TRL SFTTrainer + peft script, ``bench/trl_sft.py``  (d)

Each variant runs in a fresh process, one after another, ``--rounds`` times (the order
reversed every other round; the fastest round counts); MLX processes get Debian's OpenBLAS in
``LD_PRELOAD``, torch processes never do. The first ``--warmup`` steps are left out of the
speed numbers. At the end one scorer process computes the response-only eval loss of every
variant's adapter with mlxtune's evaluator, so the four eval losses mean the same thing.
Before the variants, ``bench/matmul_rate.py`` measures this machine's matmul rate on the model's
shapes (torch fp32 and bf16, MLX fp32); every variant gets its model FLOPs per processed position
(``mlxtune/planning/flops.py``), achieved GFLOP/s and MFU against that rate.
Results: ``bench/results/<date>-<machine>.json`` and ``.md``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench import matmul_rate  # noqa: E402
from bench.summary import markdown, model_flops, ratios, summarize  # noqa: E402
from mlxtune.errors import MlxtuneError  # noqa: E402

# name -> (backend, who)
VARIANTS = {"mlx_lm": ("mlx", "raw"), "mlxtune-mlx": ("mlx", "mlxtune"),
            "trl": ("torch", "raw"), "mlxtune-torch": ("torch", "mlxtune")}
MLX_KEYS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
            "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
            "down_proj": "mlp.down_proj"}


# ------------------------------------------------------------------ the shared job


def bench_recipe(path: Path, steps: int, warmup: int):
    """The recipe with ``train.steps = warmup + steps``, checked for settings every tool can express."""
    from mlxtune.recipe.loading import load_recipe

    recipe = load_recipe(path, [f"train.steps={warmup + steps}"])
    t, d = recipe.train, recipe.data
    need = {
        "train.schedule": (t.schedule, "constant"), "train.warmup_steps": (t.warmup_steps or t.warmup_ratio, 0),
        "train.grad_clip": (t.grad_clip, 0.0), "train.grad_accum": (t.grad_accum, 1),
        "data.template": (d.template, "chat"), "data.loss_on": (d.loss_on, "response"),
    }
    bad = [f"{k} = {have!r} (needs {want!r})" for k, (have, want) in need.items() if have != want]
    missing = [m for m in recipe.adapter.target_modules if m not in MLX_KEYS]
    if missing:
        bad.append(f"adapter.target_modules {missing} (mlx-lm needs llama-style projection names)")
    if bad:
        raise MlxtuneError(f"{path}: the benchmark runs only settings all four tools express the same way: " + "; ".join(bad))
    return recipe


def adapted_blocks(recipe, n_blocks: int) -> list[int]:
    """The blocks the recipe adapts; mlx-lm can only adapt the last N (its ``num_layers``)."""
    from mlxtune.adapters.lora import select_layers

    layers = select_layers(n_blocks, recipe.adapter.layers)
    if layers != list(range(n_blocks - len(layers), n_blocks)):
        raise MlxtuneError(f"adapter.layers = {recipe.adapter.layers!r}: mlx-lm adapts only the last N blocks; use \"all\" or an integer")
    return layers


def export_data(data, recipe, work: Path) -> dict[str, Path]:
    """The split mlxtune uses, as the raw tools read it: chat jsonl for mlx-lm, conversational
    prompt/completion jsonl for TRL (its completion-only loss then trains the assistant turn)."""
    from mlxtune.data.records import record_to_messages

    def convs(records: list[dict]) -> list[list[dict]]:
        out = []
        for rec in records:
            msgs = record_to_messages(rec, recipe.data)
            if recipe.data.system_prompt:
                msgs = [{"role": "system", "content": recipe.data.system_prompt}] + msgs
            if [m["role"] for m in msgs].count("assistant") != 1 or msgs[-1]["role"] != "assistant":
                raise MlxtuneError("the benchmark needs single-turn records (one final assistant message)")
            out.append(msgs)
        return out

    files = {"mlx_lm": work / "mlx_lm_data"}
    files["mlx_lm"].mkdir(parents=True, exist_ok=True)
    for split, records in (("train", data.train_records), ("eval", data.eval_records)):
        rows = convs(records)
        mlx_name = "valid" if split == "eval" else "train"
        (files["mlx_lm"] / f"{mlx_name}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
        files[f"trl_{split}"] = work / f"trl_{split}.jsonl"
        files[f"trl_{split}"].write_text("".join(json.dumps({"prompt": m[:-1], "completion": m[-1:]}) + "\n" for m in rows))
    return files


# ------------------------------------------------------------------ processes


def child_env(mlx: bool) -> dict[str, str]:
    """OpenBLAS preloaded for MLX processes only (torch keeps its own BLAS, as the mlxtune command does)."""
    from mlxtune.system.blas import openblas_path

    env = dict(os.environ)
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if "openblas" not in p]
    lib = openblas_path()
    if mlx and lib:
        preload.append(lib)
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    env["MLXTUNE_NO_OPENBLAS"] = "1"  # the harness decides the preload, no re-exec
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_child(cmd: list[str], mlx: bool, log: Path) -> dict[str, Any]:
    """Run one variant; returns its wall time, exit code and peak RSS (from wait4)."""
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=child_env(mlx), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise MlxtuneError(f"{' '.join(map(str, cmd[:4]))} ... failed with exit code {rc}; log {log}:\n{tail}")
    return {"wall_s": time.perf_counter() - t0, "load_before": load, "load_after": os.getloadavg()[0],
            "peak_rss_wait4": usage.ru_maxrss * 1024, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt}


def write_recipe(recipe, path: Path, **changes: Any) -> Path:
    """The recipe as a file of its own: data paths made absolute, top-level keys or whole
    sections replaced by ``changes``, ``train_extra`` merged into [train]."""
    import tomli_w

    raw = recipe.to_dict()
    raw["data"]["train"] = recipe.resolve_path(recipe.data.train)
    raw["data"]["eval"] = recipe.resolve_path(recipe.data.eval)
    raw["train"].update(changes.pop("train_extra", {}))
    raw.update(changes)
    path.write_text(tomli_w.dumps(raw))
    return path


@dataclasses.dataclass
class Job:
    """Everything the variants share, prepared once by the parent process."""

    recipe: Any
    model_dir: Path
    layers: list[int]  # adapted blocks
    n_blocks: int
    data_files: dict[str, Path]  # trl_train, trl_eval (jsonl), mlx_lm (folder)
    plan: list[dict[str, int]]  # mlxtune's batches: trained, real and padded tokens per step
    precision: str  # torch pair: fp32 or bf16


def run_variant(name: str, job: Job, out: Path) -> dict[str, Any]:
    """One variant in its own process, its files under ``out``; returns its measurements."""
    out.mkdir(parents=True, exist_ok=True)
    backend, who = VARIANTS[name]
    if who == "mlxtune":
        return run_mlxtune(name, backend, job, out)
    return run_mlx_lm(job, out) if name == "mlx_lm" else run_trl(job, out)


def run_mlxtune(name: str, backend: str, job: Job, out: Path) -> dict[str, Any]:
    from mlxtune.runs.rundir import read_metrics

    path = write_recipe(job.recipe, out / f"{name}.toml", backend=backend, output={"dir": str(out), "name": name},
                        train_extra=torch_switches(job.precision) if backend == "torch" else {})
    cmd = [sys.executable, "-m", "mlxtune", "run", str(path), "--overwrite", "--no-progress"]
    proc = run_child(cmd, backend == "mlx", out / f"{name}.log")
    events = read_metrics(out / name)
    train = [e for e in events if e["event"] == "train"]
    steps = []
    for e, b in zip(train, job.plan):
        if e["tokens"] != b["trained"]:
            raise MlxtuneError(f"{name}: step {e['step']} trained {e['tokens']} tokens, the batch plan says {b['trained']}")
        steps.append({"seconds": e["tokens"] / e["tokens_per_s"], "loss": e["loss"], **b})
    evals = [e for e in events if e["event"] == "eval" and e.get("adapter")]
    end = next(e for e in events if e["event"] == "end")
    return {**proc, "steps": steps, "eval_loss_own": evals[-1]["loss"] if evals else None,
            "peak_framework": end["peak_memory"], "adapter_dir": str(out / name / "adapters"),
            "settings": {"precision": job.precision, **torch_switches(job.precision)} if backend == "torch"
            else {"precision": job.recipe.model.dtype}}


def torch_switches(precision: str) -> dict[str, Any]:
    """The torch backend's recipe keys for the pair's precision (TRL gets ``bf16=`` to match)."""
    return {"autocast": "bfloat16" if precision == "bf16" else "off"}


def run_mlx_lm(job: Job, out: Path) -> dict[str, Any]:
    t, a = job.recipe.train, job.recipe.adapter
    config = {
        "model": str(job.model_dir), "train": True, "data": str(job.data_files["mlx_lm"]), "fine_tune_type": "lora",
        "optimizer": "adamw", "optimizer_config": {"adamw": {
            "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay, "bias_correction": True}},
        "seed": t.seed, "num_layers": len(job.layers), "batch_size": t.micro_batch, "iters": t.steps,
        "val_batches": -1, "learning_rate": t.lr, "steps_per_report": 1, "steps_per_eval": t.steps,
        "save_every": t.steps, "adapter_path": str(out / "mlx_lm_adapters"),
        "max_seq_length": job.recipe.data.max_seq_len, "grad_accumulation_steps": 1, "mask_prompt": True,
        "lora_parameters": {"rank": a.rank, "scale": a.scale, "dropout": a.dropout,
                            "keys": [MLX_KEYS[m] for m in a.target_modules]},
    }
    cfg_path, result = out / "mlx_lm_lora.yaml", out / "mlx_lm.json"
    cfg_path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    proc = run_child([sys.executable, str(HERE / "mlx_lm_lora.py"), str(result), "--config", str(cfg_path)], True, out / "mlx_lm.log")
    return {**proc, **json.loads(result.read_text()), "adapter_dir": config["adapter_path"],
            "settings": {k: v for k, v in config.items() if k not in ("model", "data", "adapter_path")}}


def run_trl(job: Job, out: Path) -> dict[str, Any]:
    t, a = job.recipe.train, job.recipe.adapter
    config = {
        "model": str(job.model_dir), "train": str(job.data_files["trl_train"]), "eval": str(job.data_files["trl_eval"]),
        "work": str(out / "trl"), "adapter_dir": str(out / "trl_adapter"), "rank": a.rank, "alpha": a.alpha,
        "dropout": a.dropout, "target_modules": list(a.target_modules),
        "layers": None if len(job.layers) == job.n_blocks else job.layers,
        "steps": t.steps, "micro_batch": t.micro_batch, "eval_batch": job.recipe.eval.batch_size, "lr": t.lr,
        "weight_decay": t.weight_decay, "betas": list(t.betas), "eps": t.eps, "seed": t.seed,
        "max_seq_len": job.recipe.data.max_seq_len, "precision": job.precision,
    }
    cfg_path, result = out / "trl_config.json", out / "trl.json"
    cfg_path.write_text(json.dumps(config, indent=1))
    proc = run_child([sys.executable, str(HERE / "trl_sft.py"), str(cfg_path), str(result)], False, out / "trl.log")
    measured = json.loads(result.read_text())
    measured["settings"] = {**measured.get("settings", {}), "precision": job.precision}
    return {**proc, **measured, "adapter_dir": config["adapter_dir"]}


# ------------------------------------------------------------------ common scorer


def run_scorer(recipe, variants: dict[str, dict[str, Any]], work: Path) -> None:
    """Adds ``eval_loss_common`` to every variant, from one scorer process."""
    adapters, out = work / "adapters.json", work / "scores.json"
    adapters.write_text(json.dumps({n: v["adapter_dir"] for n, v in variants.items()}))
    path = write_recipe(recipe, work / "score.toml")
    run_child([sys.executable, str(Path(__file__).resolve()), "--score", str(path), str(adapters), str(out)],
              has_module("mlx"), work / "score.log")
    for n, s in json.loads(out.read_text())["losses"].items():
        variants[n]["eval_loss_common"] = s["loss"]
        variants[n]["eval_tokens_common"] = s["tokens"]


def score(recipe_path: str, adapters_json: str, out: str) -> None:
    """Response-only eval loss of each adapter on the eval split, with mlxtune's evaluator."""
    from mlxtune.data.batching import eval_batches
    from mlxtune.evaluation.scoring import evaluate
    from mlxtune.recipe.loading import load_recipe
    from mlxtune.models.source import pad_id
    from mlxtune.training.session import load_backend_with_adapter, prepare

    recipe = load_recipe(recipe_path)
    model_dir, tokenizer, data = prepare(recipe)
    backend_name = "mlx" if has_module("mlx") else "torch"
    backend = load_backend_with_adapter(backend_name, model_dir, recipe)
    batches = eval_batches(data.eval, recipe.eval.batch_size, pad_id(tokenizer))
    result = {}
    for name, path in json.loads(Path(adapters_json).read_text()).items():
        backend.load_adapter(Path(path))
        ev = evaluate(backend, batches)
        result[name] = {"loss": ev["loss"], "loss_full": ev["loss_full"], "tokens": ev["tokens"]}
    Path(out).write_text(json.dumps({"scorer": backend_name, "losses": result}, indent=1))


# ------------------------------------------------------------------ main


def machine_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    except ImportError:
        pass
    return f"{platform.machine()}-{os.cpu_count()}cpu"


def pick_precision(choice: str) -> str:
    """``auto``: bf16 autocast where the hardware runs bf16 matmuls natively, else fp32."""
    if choice != "auto":
        return choice
    try:
        import torch

        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    except ImportError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return "bf16" if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) else "fp32"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(HERE / "bench.toml"), help="mlxtune recipe of the job (default: bench/bench.toml)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="steps run first and left out of the speed numbers")
    p.add_argument("--rounds", type=int, default=2, help="runs of every variant (order reversed each round); the fastest counts")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="torch variants (both sides): fp32, or bf16 autocast (TRL bf16=True, mlxtune train.autocast)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for <date>-<machine>.json and .md")
    p.add_argument("--machine", default="", help="machine label in the result's name (default: GPU name or arch-Ncpu)")
    p.add_argument("--work", default="", help="scratch folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--score", nargs=3, metavar=("RECIPE", "ADAPTERS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.score:
        score(*args.score)
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error(f"unknown variant(s) {unknown}" if unknown else "--steps and --rounds must be >= 1, --warmup >= 0")
    skipped = {v: "mlx is not installed" for v in names if VARIANTS[v][0] == "mlx" and not has_module("mlx")}
    names = [v for v in names if v not in skipped]
    precision = pick_precision(args.precision)
    work = Path(args.work or tempfile.mkdtemp(prefix="mlxtune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = bench(Path(args.recipe), names, args.steps, args.warmup, args.rounds, precision, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["skipped"] = skipped
    stamp = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # one file per machine and day; a bf16 run of the torch pair gets its own
    stem = out / (f"{stamp}-{args.machine or machine_name()}" + ("-bf16" if precision == "bf16" else ""))
    table = markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    print(table)
    print(f"written: {stem}.json, {stem}.md")
    return 0


def prepare_job(recipe_path: Path, steps: int, warmup: int, precision: str, work: Path) -> tuple[Job, Any]:
    """The checked recipe, the model, the data files of the raw tools and mlxtune's batch plan."""
    from mlxtune.data.batching import train_stream
    from mlxtune.models.source import read_config
    from mlxtune.models.source import pad_id
    from mlxtune.training.session import prepare

    recipe = bench_recipe(recipe_path, steps, warmup)
    model_dir, tokenizer, data = prepare(recipe)
    n_blocks = int(read_config(model_dir)["num_hidden_layers"])
    layers = adapted_blocks(recipe, n_blocks)
    t = recipe.train
    stream = train_stream(data.train, t.micro_batch, t.seed, t.bucket, pad_id(tokenizer))
    plan = []
    for _ in range(t.steps):  # mlxtune's batches, rebuilt here for their padded size
        b = next(stream)
        plan.append({"trained": b.n_targets, "real": int(b.full_mask.sum()) + len(b.tokens), "padded": int(b.tokens.size)})
    return Job(recipe, model_dir, layers, n_blocks, export_data(data, recipe, work), plan, precision), data


def bench(recipe_path: Path, names: list[str], steps: int, warmup: int, rounds: int, precision: str, work: Path) -> dict[str, Any]:
    """Every variant ``rounds`` times, the order reversed every other round so that a change in
    the machine's load hits both sides of a pair alike; each variant keeps its fastest round."""
    job, data = prepare_job(recipe_path, steps, warmup, precision, work)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip() if shutil.which("uptime") else ""
    rate = measure_matmul_rate(job, names, warmup, work)
    per_position = flops_per_position(job)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            print(f"[bench] round {r + 1}/{rounds}: {name} ({job.recipe.train.steps} steps) ...", flush=True)
            v = run_variant(name, job, work / f"round{r + 1}")
            v.update(summarize(v["steps"], warmup))
            v.update(model_flops(v["steps"], warmup, job.recipe.train.micro_batch, per_position))
            runs[name].append(v)
            print(f"[bench] {name}: {v['trained_tok_s']:.1f} trained tok/s, load {v['load_before']:.1f}, {v['wall_s']:.0f} s", flush=True)
    variants = {}
    for name, tries in runs.items():
        best = max(tries, key=lambda v: v["trained_tok_s"])
        best["rounds"] = [{k: v[k] for k in ("trained_tok_s", "step_time_s", "load_before", "load_after", "wall_s",
                                             "peak_framework", "peak_rss_wait4")} for v in tries]
        variants[name] = best
    if variants:
        run_scorer(job.recipe, variants, work)
    t = job.recipe.train
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "uptime": uptime,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
        "versions": versions(), "recipe": str(recipe_path), "warmup_steps": warmup, "timed_steps": steps, "rounds": rounds,
        "precision_torch": precision, "model_dir": str(job.model_dir),
        "job": {"train_examples": len(data.train), "eval_examples": len(data.eval), "rank": job.recipe.adapter.rank,
                "alpha": job.recipe.adapter.alpha, "target_modules": job.recipe.adapter.target_modules, "layers": job.layers,
                "micro_batch": t.micro_batch, "max_seq_len": job.recipe.data.max_seq_len, "lr": t.lr, "steps": t.steps},
        "variants": variants, "ratios": ratios(variants), "matmul_rate": rate,
    }


def flops_per_position(job: Job):
    """(padded width, trained share) -> model FLOPs per processed position of one step of the job."""
    from mlxtune.models.source import read_config
    from mlxtune.planning.flops import training_flops
    from mlxtune.planning.memory import planner_shape

    shape = planner_shape(read_config(job.model_dir))
    a = job.recipe.adapter
    return lambda width, share: training_flops(shape, a.rank, set(a.target_modules), len(job.layers), width, share).total


def measure_matmul_rate(job: Job, names: list[str], warmup: int, work: Path) -> dict[str, Any]:
    """The machine's matmul GFLOP/s on the model's shapes (rows = micro batch x the mean padded
    width of the timed batches), for the frameworks the variants use, each in a fresh process
    before any variant runs."""
    timed = job.plan[warmup:] or job.plan
    rows = round(sum(b["padded"] for b in timed) / len(timed))
    frameworks = tuple(fw for fw in ("torch", "mlx") if any(VARIANTS[n][0] == fw for n in names))
    print(f"[bench] matmul rate on the model's shapes ({rows} rows): {', '.join(frameworks)} ...", flush=True)
    rate = matmul_rate.measure(job.model_dir / "config.json", rows, work, child_env, frameworks)
    print(f"[bench] matmul GFLOP/s: {({k: round(v, 1) for k, v in rate.items() if isinstance(v, float)})}", flush=True)
    return rate


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        m = re.search(r"model name\s*:\s*(.+)", info.read_text())
        if m:
            return m.group(1).strip()
    return platform.processor()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("mlxtune", "torch", "transformers", "peft", "trl", "mlx", "mlx-lm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MlxtuneError as e:
        sys.exit(f"error: {e}")
