"""One command for the first CUDA GPU: CUDA checks, throughput + MFU, planner vs measured memory,
and the TRL ratio, on random-weight models built from mlxtune's bundled configs (no downloads).

    bench/gpu_check.sh OUT [--quick]                     # on the GPU machine (installs carried wheels)
    python bench/gpu_check.py OUT --device cpu --tiny    # the same code paths on a CPU, tiny shapes

Parts, each in its own process with a time limit (a failure or a timeout is recorded, the next
part runs): ``models`` (build the HF folders), ``cuda_checks`` (bf16 training, greedy generation,
QLoRA where bitsandbytes imports), ``throughput`` (trained tokens/s and MFU per model),
``memory`` (planner vs torch.cuda.max_memory_allocated), ``trl`` (mlxtune / TRL tokens/s).
Writes OUT/gpu_check.json and OUT/gpu_check.md. See bench/gpu_parts.py for what each measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# seconds per part on the GPU; the whole run also stops at --budget (default 450 s < 8 minutes)
LIMITS = {"models": 100, "cuda_checks": 100, "throughput": 140, "memory": 60, "trl": 100}
ORDER = list(LIMITS)


def run_part(name: str, ctx: dict, limit: float) -> dict[str, Any]:
    """Part ``name`` in a child process of its own session (killed as a group at ``limit``);
    returns its status, seconds, error and what it saved (also partial results)."""
    work = Path(ctx["work"])
    ctx_file, result = work / "ctx.json", work / f"part_{name}.json"
    ctx_file.write_text(json.dumps(ctx))
    result.unlink(missing_ok=True)
    log = work / f"part_{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--part", name, str(ctx_file), str(result)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, limit))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the part and the runs it started
            proc.wait()
            status = "timeout"
    rec: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t0, 1), "limit_s": round(limit)}
    saved = json.loads(result.read_text()) if result.is_file() else {}
    rec["result"] = saved.get("result", {})
    if status != "ok":
        tail = log.read_text(errors="replace").strip().splitlines()
        rec["error"] = saved.get("error") or (f"stopped after {limit:.0f} s" if status == "timeout" else "") or "\n".join(tail[-5:])
    if isinstance(rec["result"], dict) and rec["result"].get("skipped"):
        rec["status"] = "skipped"
    return rec


def child(name: str, ctx_file: str, result_file: str) -> int:
    """Inside the part's process: run it, saving partial results as it goes."""
    from bench.gpu_parts import PARTS

    ctx = json.loads(Path(ctx_file).read_text())
    out = Path(result_file)

    def save(result: dict, error: str | None = None) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"result": result, **({"error": error} if error else {})}, indent=1, default=str))
        os.replace(tmp, out)

    try:
        save(PARTS[name](ctx, save))
        return 0
    except Exception as e:  # recorded for the report; the next part still runs
        partial = json.loads(out.read_text())["result"] if out.is_file() else {}
        save(partial, f"{type(e).__name__}: {e}"[-2000:])
        traceback.print_exc()
        return 1


def environment(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory"] = torch.cuda.get_device_properties(0).total_memory
    return info


def check(ctx: dict, parts: list[str], budget: float, limits: dict[str, float]) -> dict[str, Any]:
    """Every part in order within ``budget`` seconds; the models' paths go to the later parts."""
    start = time.perf_counter()
    result: dict[str, Any] = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                              "device": ctx["device"], "tiny": ctx["tiny"], "quick": ctx["quick"],
                              "environment": environment(ctx["device"]), "parts": {}}
    for name in parts:
        left = budget - (time.perf_counter() - start)
        if left < 5:
            result["parts"][name] = {"status": "timeout", "seconds": 0, "error": f"no time left of the {budget:.0f} s budget",
                                     "result": {}}
            continue
        print(f"[gpu_check] {name} (limit {min(limits[name], left):.0f} s) ...", flush=True)
        rec = run_part(name, ctx, min(limits[name], left))
        result["parts"][name] = rec
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s" + (f": {rec['error'][-300:]}" if rec.get("error") else ""),
              flush=True)
        if name == "models":
            ctx["models"] = {k: v["path"] for k, v in rec["result"].items()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes of the same architectures, 2-3 steps (a CPU test)")
    p.add_argument("--quick", action="store_true", help="one model for throughput, a smaller memory grid")
    p.add_argument("--parts", default=",".join(ORDER), help="comma-separated subset of: " + ", ".join(ORDER))
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    p.add_argument("--limit", action="append", default=[], metavar="PART=SECONDS", help="a part's own time limit")
    p.add_argument("--work", default="", help="scratch folder (default: a new temporary folder, kept for its logs)")
    p.add_argument("--part", nargs=3, metavar=("NAME", "CTX", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return child(*args.part)
    if not args.out:
        p.error("give the output folder")
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in LIMITS]
    if bad:
        p.error(f"unknown part(s) {bad}")
    if "models" not in parts:
        parts.insert(0, "models")  # the later parts need the model folders (built once, reused)
    limits = dict(LIMITS)
    for item in args.limit:
        key, _, secs = item.partition("=")
        if key not in limits:
            p.error(f"--limit {item}: unknown part")
        limits[key] = float(secs)
    work = Path(args.work or tempfile.mkdtemp(prefix="mlxtune-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = {"device": args.device, "tiny": args.tiny, "quick": args.quick, "work": str(work), "models": {}}
    from bench.gpu_report import markdown

    result = check(ctx, parts, args.budget, limits)
    result["work"] = str(work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    table = markdown(result)
    (out / "gpu_check.md").write_text(table)
    print(table)
    print(f"written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
