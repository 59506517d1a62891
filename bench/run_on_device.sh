#!/bin/bash
# The GPU benchmark in one command on a machine with torch + CUDA but without diffusers,
# pydantic or torchao and without network: installs the wheels carried in .whl/
# (bench/fetch_wheels.sh), runs bench/gpu.py within its budget and leaves everything in $OUT:
#   gpu.json (results, rewritten after every part), benchmarks.md (the table), log.txt, env.txt
# Extra arguments go to bench/gpu.py (e.g. --budget 400, or --tiny for a CPU check).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fp-ray-bench}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{
    date -u; uname -a; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv 2>&1
    $PY -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
    $PY -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# The bench stops its own parts at its budget (470 s); the timeout is the backstop that still
# leaves the call time to return what it wrote.
timeout -k 10 560 $PY bench/gpu.py --out "$OUT/gpu.json" --docs "$OUT/benchmarks.md" "$@" 2>&1 | tee "$OUT/log.txt"
rc=$?
[ -f "$OUT/benchmarks.md" ] && cat "$OUT/benchmarks.md"
exit $rc
