#!/usr/bin/env bash
# `make gpu-check`: on a CUDA machine, with the python3 and torch found there
# (nothing is installed), build the extension, run the CUDA tests and the op
# benchmarks, and print a short table. Usage: scripts/gpu_check.sh OUT_DIR
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "gpu-check needs a CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PYEOF

# The image's default CXX (/opt/gcc) links libstdc++ statically, and such an
# extension segfaults on its first error message (setup.py refuses it); the
# system compiler matches torch's shared libstdc++.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++
fi

start=$SECONDS
cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# This card's architecture only: a faster build than the default list.
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} IMAML_EXT_FORCE_CUDA=1 \
    "$PY" setup.py -q build_ext --inplace 2>&1 | tail -n 20
echo "build: $((SECONDS - start)) s"

set +e
"$PY" -m pytest -q -p no:cacheprovider python_tests/test_cuda_ops.py python_tests/test_prox_sgd_step.py \
    python_tests/test_cg_solve.py python_tests/test_extension.py python_tests/test_batched.py -k "not omniglot" 2>&1 | tee "$out/gpu-check-tests.log" | tail -n 25
tests=${PIPESTATUS[0]}
set -e

# Default name: benchmarks/results/ops-<card>-<date>.json (and .md).
bench_out=()
[ "$out" = benchmarks/results ] || bench_out=(--out "$out/ops-gpu-check.json")
"$PY" benchmarks/bench_ops.py --device cuda "${bench_out[@]}" | tee "$out/gpu-check-bench.log"
"$PY" benchmarks/meta_step_gpu_quick.py | tee "$out/gpu-check-meta-step.log"
echo "gpu-check: tests exit $tests, total $((SECONDS - start)) s"
exit "$tests"
