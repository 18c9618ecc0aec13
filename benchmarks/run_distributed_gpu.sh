#!/usr/bin/env bash
# The distributed suite on 2 GPUs with NCCL, then the FSDP2 step benchmark (see benchmarks/fsdp_step.py).
#
#   bash benchmarks/run_distributed_gpu.sh              # 2 GPUs; writes into $OUT if set, else benchmarks/results
#   DEVICE=cpu bash benchmarks/run_distributed_gpu.sh   # the same commands with gloo on the CPU (tiny preset)
#
# Needs torch with CUDA and NCCL; pytest is used where installed, else tests/support/distributed_launch.py runs the
# same scenarios. mxfp8_compat comes from ./src (no install needed). Exit status: the suite's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast stays off (shared hosts: see the device notes); the children inherit these.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
python=${PYTHON:-python3}
if [ "${DEVICE:-cuda}" = cpu ]; then
    export MXFP8_COMPAT_DIST_BACKEND=gloo; bench_args=(--device cpu --preset tiny --steps 5); tag=cpu
else
    export MXFP8_COMPAT_DIST_BACKEND=nccl; bench_args=(--device cuda --preset "${PRESET:-moe}" --steps "${STEPS:-20}"); tag=2gpu
fi
"$python" -c "import torch; print('torch', torch.__version__, 'cuda devices', torch.cuda.device_count())" | tee "$out/distributed-$tag.txt"

echo "== distributed suite (MXFP8_COMPAT_DIST_BACKEND=$MXFP8_COMPAT_DIST_BACKEND)" | tee -a "$out/distributed-$tag.txt"
if "$python" -c "import pytest" 2>/dev/null; then
    "$python" -m pytest tests/test_distributed.py -q -rA -p no:cacheprovider 2>&1 | tee -a "$out/distributed-$tag.txt"
else
    "$python" tests/support/distributed_launch.py 2>&1 | tee -a "$out/distributed-$tag.txt"
fi
suite=${PIPESTATUS[0]}

echo "== FSDP2 step benchmark" | tee -a "$out/distributed-$tag.txt"
"$python" -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/fsdp_step.py "${bench_args[@]}" 2>&1 \
    | grep -v "^W.*torch/distributed/run.py" | tee "$out/fsdp-step-$tag.txt"
exit "$suite"
