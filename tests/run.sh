#!/usr/bin/env bash
# Set up and run the whole test suite on a fresh machine (CPU only, no downloads besides PyPI packages).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet torch==2.13.0          # the CPU build first: a plain `torch` would pull CUDA
python -m pip install --quiet -r requirements-dev.txt
python -m pip install --quiet --no-deps clip-anytorch  # reference tokenizer for the live parity test (its torchvision import is bypassed)
set +e
python -m pytest -q tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi
exit "$rc"
