#!/usr/bin/env bash
# Run nextn's OpenCL kernels on a GPU machine that has the NVIDIA driver but no pyopencl/gguf and no
# network: install carried wheels, register the driver's OpenCL ICD, build the Cython extension, then
# list devices, run the kernel tests and the bench. Logs go to $OUT (or /tmp/gpu-check).
#
# Usage (repo root): bash tools/gpu-check.sh [setup] [clinfo] [tests] [slow] [bench] [profile]
#   (default: setup clinfo tests bench). `profile` runs .whl/prof/profile_step.py (per-launch event times of
#   the bench model's decode and prompt steps), when that untracked helper is there.
#
# Wheels are expected in .whl/ (git-ignored via .git/info/exclude); fetch them on a machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     pyopencl pytools platformdirs siphash24 gguf
# and copy OpenCL headers to .whl/include/CL (used only when the machine has none).
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(setup clinfo tests bench)
has() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
export PYTHONUNBUFFERED=1

# --- environment (always: every stage needs it) -------------------------------------------------------
SITE=${SITE:-/tmp/site}
if [ ! -d "$SITE/pyopencl" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
fi
# `nextn` is engine/ under another name (setup.py's package_dir): a symlink puts it on the path without pip.
mkdir -p /tmp/pkg && ln -sfn "$ROOT/engine" /tmp/pkg/nextn
export PYTHONPATH=/tmp/pkg:$SITE${PYTHONPATH:+:$PYTHONPATH}

# The NVIDIA OpenCL driver: the container mounts the driver's libraries but usually no /etc/OpenCL/vendors.
NVOCL=$(ls /usr/local/nvidia/lib64/libnvidia-opencl.so.1 /usr/local/nvidia/lib/libnvidia-opencl.so.1 \
        /usr/lib/x86_64-linux-gnu/libnvidia-opencl.so.1 /usr/lib64/libnvidia-opencl.so.1 2>/dev/null | head -1)
[ -z "$NVOCL" ] && NVOCL=$(find / -xdev -name 'libnvidia-opencl.so.1' 2>/dev/null | head -1)
if [ -n "$NVOCL" ]; then
    mkdir -p /tmp/icd && echo "$NVOCL" > /tmp/icd/nvidia.icd
    export OCL_ICD_VENDORS=/tmp/icd
    export LD_LIBRARY_PATH=$(dirname "$NVOCL")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
echo "NVIDIA OpenCL library: ${NVOCL:-none found}; OCL_ICD_VENDORS=${OCL_ICD_VENDORS:-unset}"

# --- setup: build nextn._launch against pyopencl's bundled ICD loader -----------------------------------
if has setup; then
    LOADER=$(ls "$SITE"/pyopencl/.libs/libOpenCL-*.so* 2>/dev/null | head -1)
    mkdir -p /tmp/ocl && ln -sfn "$LOADER" /tmp/ocl/libOpenCL.so
    INC="$ROOT/.whl/include"
    [ -f /usr/local/cuda/include/CL/cl.h ] && INC=/usr/local/cuda/include
    # the rpath finds the bundled loader by its soname also when pyopencl is not imported first
    ( CFLAGS="-I$INC" LDFLAGS="-L/tmp/ocl -Wl,-rpath,$SITE/pyopencl/.libs" python3 setup.py -q build_ext --inplace ) \
        > "$OUT/build.log" 2>&1 || { echo "build_ext failed"; tail -40 "$OUT/build.log"; exit 1; }
    ls engine/_launch*.so && ldd engine/_launch*.so | grep -i opencl
fi

# --- clinfo ---------------------------------------------------------------------------------------------
if has clinfo; then
    python3 - <<'EOF' 2>&1 | tee "$OUT/clinfo.txt"
import pyopencl as cl
print("pyopencl", cl.VERSION_TEXT)
for p in cl.get_platforms():
    print(f"platform: {p.name} | {p.vendor} | {p.version}")
    for d in p.get_devices():
        print(f"  device: {d.name} | driver {d.driver_version} | {d.version} | {d.opencl_c_version}")
        print(f"    CUs {d.max_compute_units}, max wg {d.max_work_group_size}, local mem {d.local_mem_size}, "
              f"global {d.global_mem_size / 2**30:.1f} GiB, max alloc {d.max_mem_alloc_size / 2**30:.1f} GiB")
        ext = d.extensions.split()
        print("    fp16:", "cl_khr_fp16" in ext, "| subgroups:", [e for e in ext if "subgroup" in e],
              "| int dot:", [e for e in ext if "dot" in e])
EOF
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee -a "$OUT/clinfo.txt"
fi

# The bench model (~320 MB, random Q8_0) takes a while to write: make it on the CPU while the tests use the GPU.
if has bench || has profile; then
    python3 -c "from nextn.devtools.bench import bench_model_path; print('bench model:', bench_model_path())" \
        > "$OUT/bench-model.log" 2>&1 &
    MODEL_PID=$!
fi

# --- tests ----------------------------------------------------------------------------------------------
if has tests; then
    files=$(ls tests/test_matmul.py tests/test_ops_*.py tests/test_plan.py tests/test_engine.py tests/test_runtime.py 2>/dev/null)
    timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -rA -p no:cacheprovider --timeout 120 --junitxml="$OUT/junit.xml" $files \
        > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -40
fi

if has slow; then
    files=$(ls tests/test_matmul.py tests/test_ops_*.py tests/test_plan.py tests/test_engine.py tests/test_runtime.py 2>/dev/null)
    timeout 300 python3 -m pytest -q -rA -p no:cacheprovider --timeout 200 -m slow --junitxml="$OUT/junit-slow.xml" $files \
        > "$OUT/pytest-slow.log" 2>&1
    echo "pytest slow rc=$?"
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest-slow.log" | tail -30
fi

# --- bench ----------------------------------------------------------------------------------------------
if has bench; then
    t0=$(date +%s)
    wait "$MODEL_PID" 2>/dev/null; cat "$OUT/bench-model.log"; echo "model ready after $(( $(date +%s) - t0 )) s more"
    t0=$(date +%s)
    timeout ${BENCH_TIMEOUT:-200} python3 -m nextn bench --repeats 3 2>&1 | tee "$OUT/bench.txt"
    echo "bench rc=$? in $(( $(date +%s) - t0 )) s"
fi

# --- profile --------------------------------------------------------------------------------------------
if has profile && [ -f .whl/prof/profile_step.py ]; then
    wait "$MODEL_PID" 2>/dev/null
    timeout ${PROFILE_TIMEOUT:-240} python3 .whl/prof/profile_step.py 2>"$OUT/profile.err" | tee "$OUT/profile.txt"
    echo "profile rc=$?"
fi
