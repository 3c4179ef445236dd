#!/usr/bin/env bash
# One unattended GPU check of cmrf: the CUDA tests, then `cmrf bench --device cuda`.
#
#   bash examples/gpu_check.sh               # tests (<= 140 s), then the benchmark (<= 290 s)
#   bash examples/gpu_check.sh --bench-only  # the benchmark again (e.g. on a machine still warm)
#
# Run from the repository root on a machine with one CUDA GPU and a python3 that has torch, Triton,
# timm, safetensors and hypothesis (the device image of this project has them; fvcore and monai are
# not, and travel as wheels in .whl/ when they are wanted: without monai the `cmrf train` check of
# tests/test_cuda.py skips; see docs/benchmarks.md). Everything is written under $OUT (default ./gpu_check_out), at most 7 files:
#   env.txt         GPU, driver, versions
#   tests.log       pytest output;  tests.xml  its JUnit report
#   bench_cuda.md   the benchmark table (stdout of cmrf bench)
#   bench_cuda.json the same figures as JSON;  bench_cuda.log  its progress lines and errors
#   upsample_cuda.md  every exact x2 upsampling formulation timed at the decoder shapes (fp32, bf16),
#                     to tune cmrf.ops.upsample.choose_method by measurement
#
# Environment overrides: PYTHON (python3), GPU_CHECK_TESTS (the test files), BENCH_DEVICE (cuda),
# BENCH_ARGS (extra `cmrf bench` options), TEST_TIMEOUT (140), BENCH_TIMEOUT (290). With the
# 20 s grace of each and the 60 s upsampling step the worst case is about 550 s: it fits a 600 s call.
# Exit status: 0 when the tests passed and the benchmark and the upsampling step finished, else 1
# (the logs say which).

set -u
# Time limits send SIGINT first (then SIGKILL 20 s later): pytest then still prints its summary and
# writes tests.xml, and cmrf bench prints the table of the rows it measured.
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-140}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-290}"
BENCH_DEVICE="${BENCH_DEVICE:-cuda}"
BENCH_ONLY=0
[ "${1:-}" = "--bench-only" ] && BENCH_ONLY=1

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset CI  # the golden files (../shared) do not travel: their tests skip instead of failing

# Wheels carried in .whl/ (fvcore, monai, ...) go to a private folder, never into the image's site.
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cmrf_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/cmrf_site"
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    "$PYTHON" - <<'EOF'
import importlib
import platform

import torch

print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          round(p.total_memory / 2**30, 1), "GiB")
for name in ("triton", "timm", "safetensors", "hypothesis", "onnxruntime", "fvcore", "monai"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # missing packages are reported, not fatal
        print(name, "missing:", type(err).__name__)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
if [ "$BENCH_ONLY" = 0 ]; then
    tests=""
    # The files whose tests run CUDA code; the rest of the suite runs on the CPU anywhere.
    for f in ${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_fused_cascade.py}; do
        [ -e "$f" ] && tests="$tests $f"
    done
    echo "== pytest$tests (timeout ${TEST_TIMEOUT} s)"
    timeout -s INT -k 20 "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$OUT/tests.xml" \
        $tests >"$OUT/tests.log" 2>&1
    rc=$?
    tail -n 40 "$OUT/tests.log"
    echo "== pytest exit status $rc"
    [ "$rc" = 0 ] || status=1
fi

echo "== cmrf bench --device $BENCH_DEVICE ${BENCH_ARGS:-} (timeout ${BENCH_TIMEOUT} s)"
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
timeout -s INT -k 20 "$BENCH_TIMEOUT" "$PYTHON" -m cmrf bench --device "$BENCH_DEVICE" ${BENCH_ARGS:-} \
    --json "$OUT/bench_cuda.json" >"$OUT/bench_cuda.md" 2>"$OUT/bench_cuda.log"
rc=$?
tail -n 30 "$OUT/bench_cuda.log"
cat "$OUT/bench_cuda.md"
echo "== cmrf bench exit status $rc"
[ "$rc" = 0 ] || status=1

echo "== upsampling formulations on $BENCH_DEVICE (timeout 60 s)"
timeout 60 "$PYTHON" - "$BENCH_DEVICE" >"$OUT/upsample_cuda.md" 2>&1 <<'EOF'
import sys

import torch

from cmrf.ops.upsample import format_measurements, measure

for dtype in (torch.float32, torch.bfloat16):
    print(format_measurements(measure(device=sys.argv[1], dtype=dtype, batch=16)), end="\n\n")
EOF
rc=$?
cat "$OUT/upsample_cuda.md"
echo "== upsampling exit status $rc"
[ "$rc" = 0 ] || status=1
exit "$status"
