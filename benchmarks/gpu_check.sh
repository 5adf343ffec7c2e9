#!/usr/bin/env bash
# One command for a GPU owner: run seg's CUDA tests, then print the GPU's absolute figures (extraction
# images/s and its fraction of the bf16 matmul rate measured in the same run, the phase-3 head step
# in bf16 against its FLOP floor and in train-head's GPU default, fp16 with a GradScaler, with and without
# cuDNN's autotuner, a cached epoch against a one-stage one). Under 5 minutes on a recent GPU.
# Without CUDA it says so and exits 0. Run from the repository root with seg installed (-e '.[test]').
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')): nothing to check"
    exit 0
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(), '| capability', torch.cuda.get_device_capability(), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPUs', torch.cuda.device_count())"
"$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
tests=$?
"$PY" benchmarks/gpu_figures.py
figures=$?
if [ "$tests" -ne 0 ] || [ "$figures" -ne 0 ]; then
    echo "gpu_check: FAILED (tests exit $tests, figures exit $figures)"
    exit 1
fi
echo "gpu_check: all CUDA tests passed"
