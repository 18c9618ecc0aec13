#!/usr/bin/env bash
# The MoE stacks' training step on the device tool's GPU machine (torch preinstalled, no network).
# Its image has transformers 5.17, numpy and huggingface_hub; carry what it lacks, for its Python
# (3.12), in .carry/wheels:
#
#   pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.12 \
#       torchtitan==0.3.0 nemo-automodel==0.7.0 spmd_types==0.2.3 tyro==1.0.17 docstring_parser typeguard pyyaml \
#       -d .carry/wheels
#
#   device run: bash benchmarks/run_stack_step_gpu.sh        (carry: [".carry/wheels"]; output in $OUT)
#
# The stacks install with --no-deps into a --target folder (their training-loop dependencies are
# never imported by their MoE layers); torchao is absent there, so `emulated` is the fast emulation.
set -uo pipefail
out=${OUT:-/tmp/out}
site=/tmp/stack-site
mkdir -p "$out" && rm -rf "$site"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .carry/wheels/*.whl || exit 1
export PYTHONPATH="$PWD/src:$site" PYTHONUNBUFFERED=1
shape=${MXFP8_STACK_SHAPE:-"--dim 2048 --hidden 1408 --experts 64 --top-k 8 --tokens 16384"}
{
    nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
    echo "commit ${MXFP8_COMPAT_COMMIT:-unknown}; $(date -u +%F)"
    echo "# python3 benchmarks/stack_step.py --device cuda --dtype bfloat16 $shape"
    python3 benchmarks/stack_step.py --device cuda --dtype bfloat16 $shape
    echo "# python3 benchmarks/stack_step.py --device cuda --dtype bfloat16 --dim 1024 --hidden 512 --experts 8 --top-k 2 --tokens 4096"
    python3 benchmarks/stack_step.py --device cuda --dtype bfloat16 --dim 1024 --hidden 512 --experts 8 --top-k 2 --tokens 4096
} 2>&1 | tee "$out/stack-step-gpu.txt"
