#!/usr/bin/env bash
# The one prepared command for a CUDA GPU machine without network (bench/gpu_check.py says what
# it measures). Under 8 minutes; writes OUT/gpu_check.json, OUT/gpu_check.md and the parts' logs.
#
#   bench/gpu_check.sh --prepare          # here, with PyPI: the wheels the GPU image lacks -> bench/gpu_wheels/
#   bench/gpu_check.sh OUT [--quick] ...  # there: installs those wheels, then runs every part
#
# Options after OUT go to bench/gpu_check.py (--quick, --parts, --budget, --limit PART=S).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEEL_DIR=bench/gpu_wheels
# What the GPU image (Python 3.12, torch, transformers, peft, accelerate, click, rich, pandas,
# pyarrow, xxhash) lacks: mlxtune's tomli-w, TRL and its datasets. Pinned as in
# mlxtune/constraints.txt; all pure Python. bitsandbytes is not carried (its CUDA wheel is
# ~60-120 MiB, over the tree's budget): the QLoRA check reports "skipped" unless it is there.
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 tomli-w==1.2.0)

if [ "${1:-}" = "--prepare" ]; then
    rm -rf "$WHEEL_DIR" && mkdir -p "$WHEEL_DIR"
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        -d "$WHEEL_DIR" "${WHEELS[@]}" || exit 1
    ls -1 "$WHEEL_DIR"
    du -sh "$WHEEL_DIR"
    exit 0
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bench/gpu_check.sh OUT [--quick] | bench/gpu_check.sh --prepare" >&2
    exit 2
fi
OUT=$1
shift
mkdir -p "$OUT"
SITE=$(mktemp -d)
if ls "$WHEEL_DIR"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEEL_DIR"/*.whl \
        || echo "warning: the carried wheels did not install; parts that need them will fail" >&2
else
    echo "note: no $WHEEL_DIR/*.whl (run bench/gpu_check.sh --prepare where PyPI is reachable)" >&2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# an editable install gives mlxtune its version metadata; without one it still runs from PYTHONPATH
$PY -m pip show mlxtune >/dev/null 2>&1 || $PY -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "note: no editable install of mlxtune; it runs from PYTHONPATH" >&2
WORK=$(mktemp -d)
# the parts stop themselves within --budget (450 s); this is the backstop
timeout -k 10 470 $PY bench/gpu_check.py "$OUT" --work "$WORK" "$@"
rc=$?
tar czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" --exclude=models --exclude='*.safetensors' --exclude='*.bin' . 2>/dev/null
rm -rf "$WORK" "$SITE"
exit $rc
