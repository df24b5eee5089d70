#!/usr/bin/env bash
# The README's main command: set up .venv if needed, then run `koala demo` (SmolLM2 + the shipped KOALA head).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec .venv/bin/koala demo "$@"
