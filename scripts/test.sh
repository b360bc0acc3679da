#!/usr/bin/env bash
# The test command: set up (idempotent), lint, run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check cake tests bench
.venv/bin/python -m pytest -q "$@"
