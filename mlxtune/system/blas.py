"""Which BLAS the MLX CPU backend uses, and the OpenBLAS fast path on Linux.

The ``mlx[cpu]`` wheel links ``libmlx.so`` against a reference BLAS it bundles
(``mlx_cpu.libs/libblas-*.so``): fp32 matmul runs at about 6 GFLOP/s on two cores. Debian's
OpenBLAS (package ``libopenblas0-pthread``) loaded in its place with ``LD_PRELOAD`` runs the same
matmul at about 200 GFLOP/s. Installing the package alone does nothing: the library has to be
preloaded before ``libmlx.so`` is loaded, i.e. before the process starts. So the ``mlxtune``
entry point, for commands that will use MLX (:func:`command_uses_mlx`), calls
:func:`maybe_reexec_with_openblas` first thing, which re-executes the same command once with
``LD_PRELOAD`` set; the test suite's conftest does the same for pytest. Set
``MLXTUNE_NO_OPENBLAS=1`` to turn this off.

Nothing here imports mlx at module import time.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from pathlib import Path

# Debian / Ubuntu (libopenblas0-pthread), multiarch paths.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
NO_OPENBLAS_ENV = "MLXTUNE_NO_OPENBLAS"
_REEXEC_MARK = "MLXTUNE_OPENBLAS_REEXEC"


def openblas_path() -> str | None:
    """The Debian OpenBLAS shared library on this machine, or None."""
    for cand in OPENBLAS_CANDIDATES:
        if Path(cand).is_file():
            return cand
    return None


def _preloaded(lib: str, env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    entries = (os.environ if env is None else env).get("LD_PRELOAD", "").replace(":", " ").split()
    real = os.path.realpath(lib)
    return any(e == lib or os.path.realpath(e) == real for e in entries)


def should_reexec(environ: dict[str, str] | None = None, in_pytest: bool = False) -> str | None:
    """The OpenBLAS path to preload if the current process ought to be re-executed, else None.

    ``in_pytest``: the caller is the test suite's conftest, at start-up, where re-running the
    whole pytest command is wanted; anywhere else inside pytest (CliRunner calling ``main``) it
    is not."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return None
    if env.get(NO_OPENBLAS_ENV) or env.get(_REEXEC_MARK):
        return None
    if "pytest" in sys.modules and not in_pytest:
        return None
    if "mlx" in sys.modules:  # too late in this process, and re-executing would surprise
        return None
    lib = openblas_path()
    if lib is None:
        return None
    if importlib.util.find_spec("mlx") is None:  # no MLX installed: nothing to speed up
        return None
    if _preloaded(lib, env):
        return None
    return lib


def command_uses_mlx(args: list[str]) -> bool:
    """Whether an ``mlxtune`` command line will run MLX (its CPU matmuls want OpenBLAS).

    Preloading OpenBLAS changes torch too: its BLAS calls then go to OpenBLAS instead of the
    BLAS it ships with, so only commands that use MLX get it: ``doctor``, and
    commands whose ``--backend``, ``--set backend=`` or recipe file says ``mlx`` (``auto``
    means MLX only on Apple Silicon, where this function is never needed).
    """
    if args[:1] == ["doctor"]:
        return True
    for i, a in enumerate(args):
        if a == "--backend" and args[i + 1:i + 2]:
            return args[i + 1] == "mlx"
        if a.startswith("--backend="):
            return a.split("=", 1)[1] == "mlx"
    for i, a in enumerate(args):
        if a == "--set" and args[i + 1:i + 2] and args[i + 1].replace(" ", "") in ("backend=mlx", 'backend="mlx"'):
            return True
    import tomllib

    for a in args:
        # a recipe file, or a run directory (generate, chat, export: its recipe.resolved.toml names the backend it trained on)
        path = a if a.endswith(".toml") else os.path.join(a, "recipe.resolved.toml")
        if os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    return tomllib.load(f).get("backend") == "mlx"
            except (OSError, tomllib.TOMLDecodeError):
                return False  # the command itself reports the problem
    return False


def maybe_reexec_with_openblas(argv: list[str] | None = None, in_pytest: bool = False) -> None:
    """On Linux with MLX and Debian's OpenBLAS installed, re-execute this very command with the
    OpenBLAS library in ``LD_PRELOAD`` and ``OMP_WAIT_POLICY=PASSIVE`` unless already set (once;
    ``MLXTUNE_NO_OPENBLAS=1`` disables it).

    ``argv`` is the command to re-run without the interpreter, as in ``sys.argv``. By default
    (or when ``sys.argv`` is passed) the interpreter's original command line
    (``sys.orig_argv``) is used, so ``python -m mlxtune ...`` is re-run as such. Returns only
    when no re-execution is needed; on failure to exec it returns silently and the slow path
    is used (``mlxtune doctor`` reports it).
    """
    lib = should_reexec(in_pytest=in_pytest)
    if lib is None:
        return
    orig = getattr(sys, "orig_argv", None)
    if orig and (argv is None or list(argv) == list(sys.argv)):
        args = [sys.executable, *orig[1:]]
    else:
        args = [sys.executable, *(argv if argv is not None else sys.argv)]
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env["LD_PRELOAD"]).strip() if env.get("LD_PRELOAD") else lib
    env[_REEXEC_MARK] = "1"
    # OpenBLAS brings its own threads: torch's OpenMP threads must not spin-wait for the cores
    # between ops (torch in the same process trained ~2x slower with them spinning)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, args, env)
    except OSError:
        return


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _provider(handle: int | None, symbol: bytes) -> str | None:
    """File name of the shared object that provides ``symbol`` as seen from ``handle``."""
    try:
        libc = ctypes.CDLL(None)
        dlsym = libc.dlsym
        dlsym.restype = ctypes.c_void_p
        dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        addr = dlsym(handle, symbol)
        if not addr:
            return None
        dladdr = libc.dladdr
        dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        info = _DlInfo()
        if dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) and info.dli_fname:
            return os.path.normpath(os.fsdecode(info.dli_fname))
    except (OSError, AttributeError):
        return None
    return None


def _classify(path: str) -> tuple[str, bool]:
    name = os.path.basename(path).lower()
    if "mlx_cpu.libs" in path or (name.startswith("libblas") and "openblas" not in name):
        return "reference BLAS bundled with mlx[cpu] (slow)", True
    if "openblas" in name or "openblas" in path.lower():
        return "OpenBLAS", False
    if "mkl" in name:
        return "Intel MKL", False
    if "blis" in name:
        return "BLIS", False
    return name, False


def blas_in_use() -> dict[str, object]:
    """Which BLAS MLX's CPU matmuls resolve to in this process (imports mlx.core).

    Returns ``{"name": str, "path": str | None, "slow": bool, "preloaded": bool}``. On Linux the
    symbol ``cblas_sgemm`` is looked up the way the dynamic linker binds ``libmlx.so``: the
    global scope first (``LD_PRELOAD``), then libmlx's own dependencies.
    """
    out: dict[str, object] = {"name": "unknown", "path": None, "slow": False, "preloaded": False}
    try:
        import mlx.core  # noqa: F401  (loads libmlx and its BLAS)
    except ImportError:
        out["name"] = "mlx not installed"
        return out
    if sys.platform == "darwin":
        out["name"] = "Accelerate (macOS)"
        return out
    if not sys.platform.startswith("linux"):
        return out
    path = _provider(None, b"cblas_sgemm")  # global scope: LD_PRELOAD and the executable
    if path is not None:
        out["preloaded"] = True
    else:
        libmlx = None
        try:
            with open("/proc/self/maps") as f:
                for line in f:
                    p = line.split()[-1] if line.strip() else ""
                    if os.path.basename(p).startswith("libmlx") and ".so" in p:
                        libmlx = p
                        break
        except OSError:
            pass
        if libmlx:
            try:
                rtld_noload = 4
                h = ctypes.CDLL(libmlx, mode=rtld_noload | ctypes.RTLD_LOCAL)._handle
                path = _provider(h, b"cblas_sgemm")
            except OSError:
                path = None
    if path is None:
        return out
    name, slow = _classify(path)
    out.update(name=name, path=path, slow=slow)
    return out


def blas_summary() -> str:
    """One line for reports: ``OpenBLAS (/usr/lib/...)``."""
    info = blas_in_use()
    return f"{info['name']}" + (f" ({info['path']})" if info.get("path") else "")
