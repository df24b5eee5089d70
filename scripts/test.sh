#!/usr/bin/env bash
# The README's test command (also what CI runs): set up .venv if needed, then run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
# One OpenMP thread per process: the suite's models are tiny, and on a busy 2-core machine two spinning threads per
# process made the SmolLM2 tests ~20x slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two workers (pytest-xdist) keep both cores busy: 236 s -> ~115 s on the 2-core machine. KOALA_TEST_WORKERS=0 runs
# in one process (e.g. for a debugger); each worker loads its own SmolLM2 for the slow tests.
exec .venv/bin/python -m pytest -q -n "${KOALA_TEST_WORKERS:-2}" --dist worksteal "$@"
