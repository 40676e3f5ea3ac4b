"""What machine a run ran on, for its start event and for `mlxtune compare` across machines.

Only what explains a difference in losses or speed: OS, architecture, CPU model, core count,
RAM, and the accelerator (name, memory) when torch.cuda or MLX Metal is there. Never the host
name or the user name: run directories get shared.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any


def _cpu_model() -> str:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "cpu model")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _ram() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def _accelerator() -> dict[str, Any]:
    """The GPU the run could use. Only a framework the process has already imported is asked:
    the backend loaded it, and importing the other one would cost seconds (and its threads)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            i = torch.cuda.current_device()
            return {"accelerator": torch.cuda.get_device_name(i),
                    "accelerator_memory": int(torch.cuda.get_device_properties(i).total_memory),
                    "accelerator_count": int(torch.cuda.device_count())}
    except Exception:  # a broken CUDA setup must not stop a run from starting
        pass
    mx = sys.modules.get("mlx.core")
    try:
        if mx is not None and mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            return {"accelerator": f"{info.get('device_name', 'Apple GPU')} (Metal)",
                    "accelerator_memory": int(info.get("memory_size", 0)) or None}
    except Exception:
        pass
    return {}


def machine() -> dict[str, Any]:
    """This machine, as a JSON-able dict (the "machine" of a run's start event)."""
    return {"os": platform.system(), "os_release": platform.release(), "arch": platform.machine(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "memory": _ram(), **_accelerator()}


def _gib(n: Any) -> str:
    return f"{n / 2**30:.0f} GiB" if isinstance(n, (int, float)) and n > 0 else ""


def machine_line(m: dict[str, Any] | None) -> str:
    """One line naming a machine ("Linux x86_64, AMD EPYC, 2 cores, 16 GiB RAM, NVIDIA H200 141 GiB"),
    or "unknown machine" for a run from before machines were recorded."""
    if not m:
        return "unknown machine"
    parts = [" ".join(str(m[k]) for k in ("os", "arch") if m.get(k)) or "unknown OS"]
    if m.get("cpu"):
        parts.append(str(m["cpu"]))
    if m.get("cores"):
        parts.append(f"{m['cores']} cores")
    if _gib(m.get("memory")):
        parts.append(f"{_gib(m['memory'])} RAM")
    if m.get("accelerator"):
        count = f"{m['accelerator_count']} x " if (m.get("accelerator_count") or 1) > 1 else ""
        parts.append(f"{count}{m['accelerator']} {_gib(m.get('accelerator_memory'))}".rstrip())
    return ", ".join(parts)
