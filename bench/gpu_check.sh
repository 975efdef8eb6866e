#!/usr/bin/env bash
# The GPU checks of the mesh work (issue 16), as one script for a machine with a GPU. Never needed by CI.
#
#   bash bench/gpu_check.sh            # from the repository root; PYTHON=... to pick the interpreter
#
# 1. the one-device tests that take a different code path on GPU: bfloat16 compute with float32 params and
#    optimizer state (MoE, router in float32), remat, the MoE layer (ragged_dot dispatch) and the decoder;
# 2. bench/train_throughput.py: toyjax tokens/s and MFU against a float32 matmul peak measured in the same run.
# The multi-device tests of tests/test_sharding.py simulate CPU devices in subprocesses; they are run here too,
# pinned to the CPU, to show a GPU in the machine does not change them.
# Expected: every pytest line ends "passed"; the bench prints a summary with tokens/s and MFU per config.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=.
status=0

echo "== devices"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
$PY -c "import jax; print(jax.__version__, jax.devices()); assert jax.default_backend() == 'gpu', 'no GPU backend'" \
  || exit 1

echo "== one-device tests on the GPU"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_sharding.py -k "remat or bfloat16" || status=1
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_moe.py tests/test_decoder.py || status=1

echo "== mesh tests, pinned to simulated CPU devices"
JAX_PLATFORMS=cpu timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_sharding.py || status=1

echo "== training throughput and MFU (toyjax only; the PyTorch reference is a CPU baseline)"
timeout 180 $PY bench/train_throughput.py --no-torch --configs a,b --steps 40 --rounds 4 --peak-size 4096 || status=1

exit $status
