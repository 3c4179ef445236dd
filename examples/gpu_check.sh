#!/usr/bin/env bash
# One unattended GPU check of cmrf: `cmrf bench --device cuda`, then the CUDA tests (and, when
# asked, the upsampling timings).
#
#   bash examples/gpu_check.sh               # benchmark (<= 290 s), then tests (<= 170 s)
#   bash examples/gpu_check.sh --bench-only  # the benchmark again (e.g. on a machine still warm)
#   bash examples/gpu_check.sh --tests-only  # the tests alone (<= 300 s)
#   GPU_CHECK_UPSAMPLE=1 bash examples/gpu_check.sh   # also time the upsampling (<= 60 s, last;
#                                                     # with --bench-only or --tests-only too)
#
# On the H200 of 2026-11-29 the benchmark took 208 s and tests/test_cuda.py about 66 s; the two
# calls of that day ran 19 tests of tests/test_fused_cascade.py in about 130 s and stopped inside
# test_random_shapes (on a GPU every new shape compiles its kernels for real), so the whole file
# has not run there yet: one call runs the benchmark and the first tests, `--tests-only` in a
# second call the tests alone.
#
# Run from the repository root on a machine with one CUDA GPU and a python3 that has torch, Triton,
# timm, safetensors and hypothesis (the device image of this project has them; fvcore and monai are
# not, and travel as wheels in .whl/ when they are wanted: without monai the `cmrf train` check of
# tests/test_cuda.py skips; see docs/benchmarks.md). Everything is written under $OUT (default
# ./gpu_check_out, ignored by git), at most 7 files, each as its step goes (a call cut short keeps
# what was measured):
#   env.txt           GPU, driver, versions
#   bench_cuda.md     the benchmark table (stdout of cmrf bench)
#   bench_cuda.json   the same figures as JSON;  bench_cuda.log  its progress lines and errors
#   tests.log         pytest output;  tests.xml  its JUnit report
#   upsample_cuda.md  with GPU_CHECK_UPSAMPLE=1: every exact x2 upsampling formulation timed at the
#                     decoder shapes (fp32 without TF32, bf16), one table per shape as it is
#                     measured, to tune cmrf.ops.upsample.choose_method (docs/upsampling.md has
#                     the H200's table that the rule follows)
#
# The benchmark runs first (its max-diff column already compares every fast row with the
# reference), then the tests.
#
# Environment overrides: PYTHON (python3), GPU_CHECK_TESTS (test files or node ids), BENCH_DEVICE
# (cuda), BENCH_ARGS (extra `cmrf bench` options), TEST_TIMEOUT (170; 300 with --tests-only),
# BENCH_TIMEOUT (290), GPU_CHECK_UPSAMPLE (0). Each limit sends SIGINT, then SIGKILL after a grace
# (20 s, 10 s for the upsampling); the wheel install and the version report have 45 s each, and a
# test 120 s where pytest-timeout is installed. Worst case 45 + 45 + 290 + 20 + 170 + 20 = 590 s
# (660 s with the upsampling: lower TEST_TIMEOUT then; --tests-only 410 s), typically less: it
# fits a 600 s call. The call's output tail (12,000 characters) is shorter than the files: read
# the files.
# Exit status: 0 when every step run finished (the benchmark, the upsampling when asked) and the
# tests passed, else 1 (the logs say which).

set -u
RUN_BENCH=1
RUN_TESTS=1
USAGE="usage: bash examples/gpu_check.sh [--bench-only | --tests-only]   (see the comments at its top)"
case "$#:${1:-}" in
    1:--bench-only) RUN_TESTS=0 ;;
    1:--tests-only) RUN_BENCH=0 ;;
    1:--help | 1:-h) echo "$USAGE"; exit 0 ;;
    0:) ;;
    *) echo "$USAGE" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-290}"
BENCH_DEVICE="${BENCH_DEVICE:-cuda}"
if [ "$RUN_BENCH" = 1 ]; then TEST_TIMEOUT="${TEST_TIMEOUT:-170}"; else TEST_TIMEOUT="${TEST_TIMEOUT:-300}"; fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset CI  # the golden files (../shared) do not travel: their tests skip instead of failing

# Wheels carried in .whl/ (fvcore, monai, ...) go to a private folder, never into the image's site.
if compgen -G ".whl/*.whl" >/dev/null; then
    if timeout -k 5 45 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/cmrf_site .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:/tmp/cmrf_site"
    else
        echo "== installing the carried wheels failed: going on without them"
    fi
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    timeout -k 5 45 "$PYTHON" - <<'PYEOF'
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
PYEOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
if [ "$RUN_BENCH" = 1 ]; then
    echo "== cmrf bench --device $BENCH_DEVICE ${BENCH_ARGS:-} (timeout ${BENCH_TIMEOUT} s)"
    # SIGINT first: cmrf bench prints the table of the rows it measured and exits 130, which
    # --preserve-status reports (timeout's own status would be 124).
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout --preserve-status -s INT -k 20 "$BENCH_TIMEOUT" "$PYTHON" -m cmrf bench --device "$BENCH_DEVICE" \
        ${BENCH_ARGS:-} --json "$OUT/bench_cuda.json" >"$OUT/bench_cuda.md" 2>"$OUT/bench_cuda.log"
    rc=$?
    tail -n 30 "$OUT/bench_cuda.log"
    cat "$OUT/bench_cuda.md"
    echo "== cmrf bench exit status $rc"
    [ "$rc" = 0 ] || status=1
fi

# The files whose tests run CUDA code (the rest of the suite runs on the CPU anywhere); node ids
# (file::test) are kept too. An entry that names no file is said, and with none left no test runs
# (pytest would otherwise collect the whole suite).
if [ "$RUN_TESTS" = 1 ]; then
    tests=""
    for f in ${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_fused_cascade.py}; do
        if [ -e "${f%%::*}" ]; then tests="$tests $f"; else echo "== no such test file, left out: $f"; fi
    done
    if [ -z "$tests" ]; then
        echo "== no test to run"
        status=1
    else
        # A hung test (a stuck CUDA graph capture) must not take the others' time.
        per_test=""
        "$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=" --timeout 120"
        echo "== pytest$tests$per_test (timeout ${TEST_TIMEOUT} s)"
        # SIGINT first: pytest still prints its summary and writes tests.xml.
        # shellcheck disable=SC2086  # tests and per_test are lists of arguments
        timeout --preserve-status -s INT -k 20 "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider \
            --junitxml="$OUT/tests.xml" $per_test $tests >"$OUT/tests.log" 2>&1
        rc=$?
        tail -n 40 "$OUT/tests.log"
        echo "== pytest exit status $rc"
        [ "$rc" = 0 ] || status=1
    fi
fi

if [ "${GPU_CHECK_UPSAMPLE:-0}" = 1 ]; then
    echo "== upsampling formulations on $BENCH_DEVICE (timeout 60 s)"
    timeout --preserve-status -s INT -k 10 60 "$PYTHON" - "$BENCH_DEVICE" >"$OUT/upsample_cuda.md" 2>&1 <<'PYEOF'
import sys

import torch

from cmrf.ops.upsample import decoder_shapes, format_measurements, measure

# The tests compare fp32 without TF32; cuDNN's default would show TF32-sized differences here.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
print("TF32 off (cuDNN and matmul)\n", flush=True)
for dtype in (torch.float32, torch.bfloat16):
    for shape in decoder_shapes(16):  # one table per shape, printed at once: a cut keeps the others
        rows = measure(shapes=[shape], device=sys.argv[1], dtype=dtype, batch=16)
        print(format_measurements(rows), end="\n\n", flush=True)
PYEOF
    rc=$?
    cat "$OUT/upsample_cuda.md"
    echo "== upsampling exit status $rc"
    [ "$rc" = 0 ] || status=1
fi
exit "$status"
