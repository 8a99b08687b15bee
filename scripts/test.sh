#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite on JAXALIGN_TEST_WORKERS pytest workers
# (default 2; each takes whole test files, so module fixtures are built once). Extra
# arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests -n "${JAXALIGN_TEST_WORKERS:-2}" --dist loadfile "$@"
