#!/usr/bin/env bash
# Fresh machine to answer: set up, then run SmolLM2-135M-Instruct over two local workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m cake.faces.demo "$@"
