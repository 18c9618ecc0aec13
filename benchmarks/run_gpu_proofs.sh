#!/usr/bin/env bash
# The GPU tier of the tests and the emulation benchmark, in one device-tool call (torch and triton
# preinstalled there, no torchao needed):
#
#   device run: bash benchmarks/run_gpu_proofs.sh        (output lands in $OUT; copied to benchmarks/results/)
#
# tests: every test marked `cuda` in the GPU-facing files (the `large` ones allocate 4-12 GB each);
# benchmark: benchmarks/emulation_speed.py --check (bitwise against the reference at the MoE shapes).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
    echo "commit ${MXFP8_COMPAT_COMMIT:-unknown}; $(date -u +%F)"
} | tee "$out/gpu-proofs-env.txt"
python3 -m pytest -q -p no:cacheprovider -rs -m cuda ${MXFP8_GPU_TEST_FILES:-tests/test_cuda_scale.py tests/test_cuda_token_groups.py tests/test_fast_emulation.py} \
    2>&1 | tee "$out/cuda-tests.txt"
echo "pytest exit ${PIPESTATUS[0]}"
if [ -z "${MXFP8_SKIP_BENCH:-}" ]; then
    python3 benchmarks/emulation_speed.py --check --graphs \
        --shapes 8,16384,7168,2048 16,32768,4096,1536 64,65536,2048,768 8,4096,2048,1024 2>&1 | tee "$out/emulation-speed.txt"
fi
