#!/usr/bin/env bash
# The test command: set up (idempotent), lint, run the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check cake tests bench
# Two pytest processes at most (one per core), each taking whole files: a file's module-scoped
# clusters and fixed discovery namespaces stay in one process.
.venv/bin/python -m pytest -q -n auto --maxprocesses 2 --dist loadfile "$@"
