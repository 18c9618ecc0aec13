#!/usr/bin/env bash
# The GPU rows of the compatibility matrix: the tox envs' commands (pytest, then the record),
# run on the device tool's GPU machine, whose torch (2.11.0+cu130) is preinstalled and which
# has no network (pytest and hypothesis are in its image). Carry the torchao wheels and torchao
# main's source tarball in .carry/ao (`pip download --no-deps torchao==X -d .carry/ao`;
# ../shared/torchao-main-36027d8.tar.gz):
#
#   device run: MXFP8_COMPAT_COMMIT=<git rev-parse HEAD of the checkout> bash tools/device_matrix.sh      (carry: [".carry/ao"])
#
# The copy of the tree on the GPU machine has no .git: MXFP8_COMPAT_COMMIT names the commit in
# each record (else it says "unknown" and the rendered matrix marks it so).
#
# Everything lands in $OUT/gpu-matrix.tar.gz: results/<env>-<device>.json, and each env's log.
set -u
out=${OUT:-/tmp/out}
work=/tmp/device-matrix
rm -rf "$work" && mkdir -p "$work/results" "$work/logs"
# The CPU-only, CPU-heavy files (hypothesis properties, inductor compiles, the training loop, the
# wheel-conformance stand-ins, the gloo multi-process suite: benchmarks/run_distributed_gpu.sh runs
# that one on 2 GPUs) prove nothing more on this machine and would not fit the 10-minute call.
cpu_only="--ignore=tests/test_properties.py --ignore=tests/test_compile.py --ignore=tests/test_training.py"
cpu_only="$cpu_only --ignore=tests/test_wheel_conformance.py --ignore=tests/test_distributed.py"
# Eight envs share one GPU and its host in one call: by default only the tests that exercise the GPU
# or the installed torchao run (MXFP8_DEVICE_TESTS="" runs the whole suite above, given time).
# The `large` tests (4-12 GB each, and the OOM test, which needs the GPU to itself) run alone in
# benchmarks/run_gpu_proofs.sh: eight envs at once would exhaust the card between them.
select=${MXFP8_DEVICE_TESTS-"(cuda or torchao) and not large"}
# Eight pytest processes on one host: two CPU threads each, or their CPU GEMMs oversubscribe the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
runner="tools/device_matrix.sh on a GPU machine: preinstalled torch $(python3 -c 'import torch; print(torch.__version__)'), torchao wheel installed with pip --target, tests selected by -m '${select:-all}' (CPU-only files left out)"

run_env() {  # env name, wheel glob (empty: no torchao), expected generation
    local env=$1 wheel=$2 expect=$3 site=/tmp/site-$1
    rm -rf "$site" && mkdir -p "$site"
    if [ "$wheel" = main ]; then  # torchao main: pure Python without its C++ extensions
        mkdir -p /tmp/ao-main && tar -xzf .carry/ao/torchao-main-*.tar.gz -C /tmp/ao-main
        USE_CPP=0 VERSION_SUFFIX=+git36027d8 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
            --target "$site" /tmp/ao-main/torchao-main >/dev/null 2>&1 || { echo "$env: install failed"; return 1; }
    elif [ -n "$wheel" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .carry/ao/$wheel || return 1
    fi
    export PYTHONPATH="$site:$PWD/src:$PWD/tools"
    MXFP8_COMPAT_EXPECT_GENERATION=$expect MXFP8_COMPAT_CACHE_DIR=/tmp/cache-$env \
        timeout "${PYTEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider $cpu_only ${select:+-m "$select"} \
        --junitxml="$work/logs/$env.xml" >"$work/logs/$env.log" 2>&1
    echo "$env pytest exit $?: $(tail -n 1 "$work/logs/$env.log")"
    python3 -m mxfp8_compat_dev.matrix record --env "$env" --junit "$work/logs/$env.xml" --dir "$work/results" --runner "$runner" \
        >>"$work/logs/$env.log" 2>&1 || echo "$env: record failed"
}

nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader
run_env notorchao "" "" &
run_env torchao013 "torchao-0.13.0*" 0.13 &
run_env torchao014 "torchao-0.14.1*" 0.14 &
run_env torchao015 "torchao-0.15.0*" 0.15 &
run_env torchao016 "torchao-0.16.0*" 0.16 &
run_env torchao017 "torchao-0.17.0*" 0.17 &
run_env torchao018 "torchao-0.18.0*" 0.18 &
run_env main main 0.18 &
wait
tar -czf "$out/gpu-matrix.tar.gz" -C "$work" results logs
ls "$work/results"
