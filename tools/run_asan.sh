#!/usr/bin/env bash
# Build tconv's compiled code with AddressSanitizer and run tests under it (issue 7).
#
#   tools/run_asan.sh                      # representative subset, ~2-5 minutes
#   tools/run_asan.sh tests/test_nan_inf.py -k blas   # any pytest arguments instead
#   TCONV_ASAN_FUZZ=20000 tools/run_asan.sh           # more malformed-input fuzz cases
#   TCONV_ASAN_VALGRIND=1 tools/run_asan.sh           # also valgrind memcheck (tools/valgrind_check.py)
#
# Nothing is built in the repository or installed anywhere: the working tree
# (tracked and untracked-but-not-ignored files) is copied to a throwaway
# directory, the core (`TCONV_SANITIZE=address`, see setup.py) and the OpenMP
# plugin (if present; CFLAGS=-fsanitize=address) are built in place there,
# and the tests run from that copy with libasan preloaded into an
# uninstrumented Python. Leak detection is off (Python itself does not free
# everything at exit); any other ASan report (heap/stack/global overflow,
# use-after-free, double free...) aborts the process and fails the run.
#
# Environment: PYTHON (default: python3 on PATH, e.g. an activated venv with
# numpy, scipy, Cython, pytest, hypothesis), TCONV_ASAN_DIR (keep the copy
# there instead of a temporary directory), TCONV_ASAN_FUZZ (fuzz cases, default 3000).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
FUZZ_CASES="${TCONV_ASAN_FUZZ:-3000}"
if [[ -n "${TCONV_ASAN_DIR:-}" ]]; then
    WORK="$TCONV_ASAN_DIR"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/tconv-asan.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
fi
SRC="$WORK/src"
LOGS="$WORK/asan-logs"
mkdir -p "$SRC" "$LOGS"

say() { printf '\n== %s\n' "$*"; }

say "copying the working tree to $SRC"
# (files deleted in the working tree but still tracked are skipped)
(cd "$REPO" && git ls-files --cached --others --exclude-standard -z |
    while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done |
    tar --null -T - -cf -) | tar -xf - -C "$SRC"

say "building the core with AddressSanitizer"
(cd "$SRC" && TCONV_SANITIZE=address "$PYTHON" setup.py -q build_ext --inplace 2>&1 | tail -5)
PYPATH="$SRC"
if [[ -f "$SRC/backends/openmp/setup.py" ]]; then
    say "building the openmp plugin with AddressSanitizer"
    (cd "$SRC/backends/openmp" &&
        CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" LDFLAGS="-fsanitize=address" \
        "$PYTHON" setup.py -q build_ext --inplace 2>&1 | tail -5) || echo "(openmp plugin did not build; its tests will skip)"
    PYPATH="$SRC:$SRC/backends/openmp"
fi

LIBASAN="$(gcc -print-file-name=libasan.so)"
[[ -e "$LIBASAN" ]] || { echo "libasan not found (gcc -print-file-name=libasan.so gave $LIBASAN)"; exit 2; }
export LD_PRELOAD="$LIBASAN"
# detect_leaks=0: CPython leaks by design at exit. allocator_may_return_null=1 and
# max_allocation_size_mb: a huge (legal) request must become a MemoryError, as without ASan.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:max_allocation_size_mb=4096:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1:log_path=$LOGS/asan"
export PYTHONPATH="$PYPATH"
export PYTHONDONTWRITEBYTECODE=1
export TCONV_SANITIZED=1

say "checking that the instrumented build is the one imported"
(cd "$SRC" && "$PYTHON" - <<'EOF'
import os, subprocess, sys
import tconv, tconv._blas_core as core
src = os.environ["PYTHONPATH"].split(":")[0]
assert core.__file__.startswith(src), f"imported {core.__file__}, not the copy in {src}"
symbols = subprocess.run(["nm", "-D", core.__file__], capture_output=True, text=True).stdout
assert "__asan_" in symbols, f"{core.__file__} is not instrumented"
print("tconv from", tconv.__file__)
for b in tconv.list_backends():
    print(f"  backend {b.name:7} available={b.available} {b.reason}")
try:
    import tconv_openmp, glob
    so = glob.glob(os.path.join(os.path.dirname(tconv_openmp.__file__), "*.so"))
    inst = so and "__asan_" in subprocess.run(["nm", "-D", so[0]], capture_output=True, text=True).stdout
    print("tconv_openmp from", tconv_openmp.__file__, "(instrumented)" if inst else "(NOT instrumented)")
except ImportError:
    pass
EOF
)

status=0
cd "$SRC"
if [[ $# -gt 0 ]]; then
    say "pytest $* under ASan"
    "$PYTHON" -m pytest -q -p no:cacheprovider "$@" || status=$?
else
    say "representative test subset under ASan"
    "$PYTHON" -m pytest -q -p no:cacheprovider \
        tests/test_properties.py tests/test_nan_inf.py tests/test_concurrency.py \
        tests/test_malformed.py::test_bad_argument_raises_and_names_it \
        $(ls tests/test_definition.py tests/test_gradients.py 2>/dev/null) || status=$?
    say "malformed-input fuzz under ASan: $FUZZ_CASES cases (crashes are counted per case)"
    "$PYTHON" tests/fuzz_malformed.py --cases "$FUZZ_CASES" --mem-limit-mib 0 || status=$?
fi

if [[ "${TCONV_ASAN_VALGRIND:-0}" == "1" ]] && command -v valgrind >/dev/null; then
    say "valgrind memcheck of an uninstrumented -O0 -g build of the core (tools/valgrind_check.py)"
    (
        unset LD_PRELOAD ASAN_OPTIONS
        export PYTHONPATH="$SRC"  # not the ASan-built plugin
        rm -rf build tconv/_blas_core*.so tconv/_blas_core.c  # no ASan object may be relinked
        TCONV_DEBUG=1 "$PYTHON" setup.py -q build_ext --inplace >/dev/null 2>&1
        "$PYTHON" tools/valgrind_check.py
    ) || status=$?
fi

say "AddressSanitizer reports"
asan_errors=0
if compgen -G "$LOGS/asan*" >/dev/null; then
    # allocator_may_return_null turns a too-big request into a warning and a MemoryError: not a finding
    grep -h "WARNING: AddressSanitizer failed to allocate" "$LOGS"/asan* | sort | uniq -c | sed 's/^/  (expected) /' || true
    if grep -l "ERROR: AddressSanitizer" "$LOGS"/asan* >/dev/null 2>&1; then
        asan_errors=$(grep -h -c "ERROR: AddressSanitizer" "$LOGS"/asan* | paste -sd+ | bc)
        grep -h -A40 "ERROR: AddressSanitizer" "$LOGS"/asan* | head -200
    fi
fi
echo "ASan errors: $asan_errors"
if [[ $asan_errors -ne 0 ]]; then
    echo "RESULT: FAILED (AddressSanitizer reported $asan_errors error(s), above)"
    exit 1
elif [[ $status -ne 0 ]]; then
    echo "RESULT: no ASan errors, but tests failed (status $status): see the pytest/fuzz output above"
    exit "$status"
fi
echo "RESULT: clean (tests passed under AddressSanitizer, no ASan errors)"
