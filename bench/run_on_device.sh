#!/bin/bash
# The GPU benchmark in one command on a machine with torch + CUDA but without diffusers,
# pydantic, torchao or PyAV and without network: installs the wheels carried in .whl/
# (bench/fetch_wheels.sh), runs bench/gpu.py within its budget, then renders the tiny
# checkpoint through fp-ray's own CLI on the GPU in each memory mode and with the speed flags,
# in whatever time is left. Everything lands in $OUT:
#   gpu.json (results, rewritten after every part), benchmarks.md (the table), log.txt, env.txt,
#   cli.txt (the CLI renders' output), tiny_fast.mp4, tiny_resident.mp4
# Extra arguments go to bench/gpu.py (e.g. --budget 400, or --tiny for a CPU check).
# TOTAL: seconds the whole script may take (default 585, inside the device's 600 s limit).
set -u -o pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fp-ray-bench}
TOTAL=${TOTAL:-585}
BUDGET=${BUDGET:-430}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
    date -u; uname -a; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv 2>&1
    $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
    $PY -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
    $PY -c "import av; print('av', av.__version__)" 2>&1 | tail -1
    env | grep -i -E "triton|inductor|cuda_launch|nvidia_tf32" | sort
    nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active --format=csv 2>&1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# The bench stops its own parts at its budget; the timeout is the backstop that still leaves
# time for the CLI renders and for the call to return what it wrote.
timeout -k 10 $((BUDGET + 50)) $PY bench/gpu.py --budget "$BUDGET" --out "$OUT/gpu.json" --docs "$OUT/benchmarks.md" "$@" 2>&1 | tee "$OUT/log.txt"
rc=$?
[ -f "$OUT/benchmarks.md" ] && cat "$OUT/benchmarks.md"

# fp-ray's CLI on this device with the tiny checkpoint (3 s of video, 3 sections): each memory
# mode, then the speed flags. Each gets what is left, at most 60 s.
cli() {
    local name=$1; shift
    local left=$((TOTAL - (SECONDS - start)))
    if [ $left -lt 15 ]; then echo "[cli $name] skipped: ${left} s left" | tee -a "$OUT/cli.txt"; return; fi
    local t0=$SECONDS
    echo "[cli $name] fp-ray render $*" >> "$OUT/cli.txt"
    timeout -k 5 $((left < 60 ? left : 60)) $PY -m fp_ray.cli render --seconds 3 "$@" >> "$OUT/cli.txt" 2>&1
    echo "[cli $name] rc=$? in $((SECONDS - t0)) s" | tee -a "$OUT/cli.txt"
}
# the speed flags first: the memory modes already ran on a GPU (bench/results/logs/run1_cli.txt)
cli fast --fast --out "$OUT/tiny_fast.mp4"
cli compile --compile --attention _native_cudnn --out /tmp/tiny_compile.mp4
cli resident --memory resident --out "$OUT/tiny_resident.mp4"
cli swap --memory swap --out /tmp/tiny_swap.mp4
cli offload --memory offload --out /tmp/tiny_offload.mp4
grep -h "^wrote\|error" "$OUT/cli.txt" | cut -c1-300
# the device returns at most 8 files: the sidecars stay behind
rm -f "$OUT"/*.mp4.json
exit $rc
