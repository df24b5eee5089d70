#!/usr/bin/env bash
# The README's test command (also what CI runs): set up .venv if needed, then run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/python -m pytest -q "$@"
