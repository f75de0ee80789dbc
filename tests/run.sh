#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (CPU only): both tiers, the tests marked slow (processes,
# training, the real data) included; `python -m pytest -m "not slow" tests` is the edit loop (pytest.ini). Installs
# the test-only PyPI packages into the current Python environment (a venv: nothing system-wide); nothing is installed
# system-wide unless SSIW_INSTALL_CHROMIUM=1 asks for Debian's chromium (apt-get, as root) for the browser test of
# serve.py's page, which skips without it.
# Temporary files go to one folder of $TMPDIR (a passing test's are removed as it ends: pytest.ini), removed at the end
# of a passing run; a failing run keeps its failed tests' files there and says where.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0          # the CPU build first: a plain `torch` would pull CUDA
python -m pip install --quiet -r requirements-dev.txt
python -m pip install --quiet --no-deps clip-anytorch  # reference tokenizer for the live parity test (its torchvision import is bypassed)
if [ "${SSIW_INSTALL_CHROMIUM:-0}" = 1 ] && ! command -v chromium >/dev/null; then
  apt-get update && apt-get install -y --no-install-recommends chromium
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/ssiw-tests.XXXXXX")
export TMPDIR="$tmp"                                  # pytest's tmp_path and every tempfile of the processes it starts
set +e
rc=0
if [ -z "${SSIW_TEST_BF16:-}" ] && [ $# -eq 0 ]; then
  # first the tests whose path depends on the CPU's bf16 units, with those units reported the other way than this
  # CPU has them (tests/cpu_features): a green run must not depend on the machine CI lands on
  other=$(python -c "from runtime import cpu_has_bf16; print(0 if cpu_has_bf16() else 1)")
  SSIW_TEST_BF16=$other python -m pytest -q tests/test_precision.py tests/test_evaluate.py tests/test_predict.py \
      tests/test_eval_tools.py
  rc=$?
  [ "$rc" -ne 0 ] && echo "the CPU-dependent tests failed with bf16 units reported as $other"
fi
if [ "$rc" -eq 0 ]; then
  python -m pytest -q tests "$@"
  rc=$?
  [ "$rc" -eq 5 ] && echo "pytest collected no tests: failing on purpose" && rc=1
fi
if [ "$rc" -eq 0 ]; then rm -rf "$tmp"; else echo "the failed tests' temporary files: $tmp (remove it when done)"; fi
exit "$rc"
