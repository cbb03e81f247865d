#!/usr/bin/env bash
# GPU checks, run by hand on a CUDA machine from the repository root (no install: the tree is on PYTHONPATH).
# Wheels the machine lacks (diffusers, importlib_metadata) may be put in .whl/ beside it.
#   scripts/device_check.sh           the CUDA tests and the ring-chunk kernel benchmark
#   scripts/device_check.sh cache     also the cache benchmark on the GPU, eager and with compile=True
# Results go to ${OUT:-benchmarks/results}.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, xdit_fx; print('torch', torch.__version__, 'diffusers', diffusers.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15
python3 benchmarks/ring_chunk_gpu.py --out-dir "$OUT"
if [ "${1:-}" = cache ]; then
  python3 benchmarks/cache_quality.py --device cuda --threads 8 --tag _cuda --out-dir "$OUT" 2>&1 | grep -v Warning
  python3 benchmarks/cache_quality.py --device cuda --threads 8 --compile --fbc 0.2 --teacache 0.3 \
    --calibration-generations 1 --tag _cuda_compile --out-dir "$OUT" 2>&1 | grep -v Warning
fi
