#!/usr/bin/env bash
# The GPU benchmark, one unattended run of about 2-4 minutes on one H200 (bench/gpu.py says what
# it reports). The GPU machine has torch but neither sam2 nor hydra, and cannot download, so:
#
#   1. here, with network:   bash bench/gpu.sh --prepare     (wheels into .whl/, git-ignored locally)
#   2. on the GPU machine:   device run, carry [".whl"], command "bash bench/gpu.sh"
#                            (the JSON object is printed and written to $OUT/gpu.json)
#
# Extra arguments after the first go to bench/gpu.py (e.g. --batches 1,8,32,128 --repeats 5).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=.whl
# Pure-Python packages bench.gpu needs beyond the GPU image; versions as pinned by this checkout's venv.
PACKAGES=(sam2==1.1.0 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 iopath==0.1.10)

if [[ "${1:-}" == "--prepare" ]]; then
  PY=${PY:-.venv/bin/python}
  mkdir -p "$WHEELS"
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  # sam2 is an sdist with an optional CUDA extension: build it without, against the venv's torch.
  SAM2_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "${PACKAGES[@]}"
  ls -l "$WHEELS"
  exit 0
fi

export PYTHONUNBUFFERED=1
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  echo "no wheels in $WHEELS: run 'bash bench/gpu.sh --prepare' where pip can download, and carry $WHEELS" >&2
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv || true
OUTFILE="${OUT:-/tmp}/gpu.json"
timeout 420 python3 -m bench.gpu --out "$OUTFILE" "$@"
nvidia-smi --query-gpu=memory.used,clocks.sm --format=csv || true
