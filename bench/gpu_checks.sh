#!/usr/bin/env bash
# Every GPU check of the project in one run, sized for a 15-minute device lease on one H100/H200 (about 10 min of
# work): the CUDA-vs-CPU tests, the 8B-shaped trial solver in each cache placement, and the search overhead.
# Results land in $OUT (the device tool's return folder) or bench/results/ when OUT is unset.
#
# Prepare here (once; the device image lacks scikit-optimize):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl scikit-optimize==0.10.2 pyaml
# then run it there with `.whl` carried:  bash bench/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
dest="${OUT:-bench/results}"
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 BMM_NO_PROGRESS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$dest/gpu.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | tr -cd 'A-Za-z0-9' | tr 'A-Z' 'a-z')
gpu=${gpu:-cuda}
status=0
step() { echo "== $* ($(date +%T))"; "$@" || { echo "!! failed: $*"; status=1; }; }

# 1. CUDA-vs-CPU numerics (solver, calibration Grams, anchors, trial-cache placements); ~1 min
step timeout 180 python3 -m pytest -q -m cuda -p no:cacheprovider --junitxml="$dest/pytest_cuda.xml"
# 2. 8B-shaped trial solver: resident / host-streamed / spilled, fp32/tf32/bf16 compute; target <= 2.3 s per trial
step timeout 300 python3 bench/solve_speed.py --device cuda --json "$dest/solve_speed_$gpu.json"
# 3. per-trial overhead of the search (command hook vs in-memory vs 2 Ray actors) on MiniLM shapes
step timeout 180 python3 bench/search_overhead.py --device cuda --models minilm --trials 3 --reps 2 \
  --work /tmp/bmm-overhead --out "$dest/search_overhead_$gpu.json"
exit $status
