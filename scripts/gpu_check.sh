#!/usr/bin/env bash
# The GPU check, one command on a CUDA machine from a clean clone (under 8 minutes on one GPU):
#   1. parity tests on the GPU: our model against transformers on the same device, in f32, bf16
#      and f16 (tests/test_device_parity.py with CAKE_TEST_DEVICE);
#   2. decode as users run it, timed from outside: transformers `generate`, cake local, cake
#      master + 2 workers (bench/gpu.py, a random model in the Llama 3.2 1B shape, bf16);
#   3. one table of both, on stdout (also bench/results/gpu/gpu.md and gpu.json);
#   4. quantized kernels (int8, int4) and batched steps on the GPU (bench/gpu_quant.py).
#
#   bash scripts/gpu_check.sh                    # cuda:0
#   CAKE_GPU=cuda:1 GPU_CHECK_TOKENS=256 bash scripts/gpu_check.sh
#
# It never installs torch: it runs on the first Python whose torch sees a CUDA GPU ($PYTHON,
# ./.venv/bin/python, python3). cake runs from this folder (PYTHONPATH), not installed. Missing
# pure-Python packages (pyyaml, msgpack, ...) are installed from ./wheels if that folder exists
# (machines without network), else from PyPI. Exit status: 0 when every check passed.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
root=$PWD
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
device=${CAKE_GPU:-cuda:0}
tokens=${GPU_CHECK_TOKENS:-128}
rounds=${GPU_CHECK_ROUNDS:-2}
out=bench/results/gpu
started=$SECONDS

say() { echo "gpu_check: $*" >&2; }
die() {
    echo "gpu_check: error: $*" >&2
    exit 1
}

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
candidates+=(.venv/bin/python python3)

python=""
for candidate in "${candidates[@]}"; do
    command -v "$candidate" >/dev/null 2>&1 || continue
    if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        >/dev/null 2>&1; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    for candidate in "${candidates[@]}"; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if found=$("$candidate" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null); then
            die "no CUDA GPU: $candidate has torch $found, but torch.cuda.is_available() is" \
                "False (no GPU, no driver, or a CPU-only torch build). Run this on a CUDA machine."
        fi
    done
    die "no Python with torch found (tried ${candidates[*]}); install a CUDA build of torch" \
        "first (this script never installs torch), or set PYTHON=/path/to/python"
fi
say "using $python: $("$python" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())')"

# module -> pip name, for what the checks import besides torch
declare -A packages=(
    [transformers]=transformers [safetensors]=safetensors [tokenizers]=tokenizers
    [yaml]=pyyaml [click]=click [msgpack]=msgpack [pytest]=pytest [tqdm]=tqdm
)
missing=()
for module in "${!packages[@]}"; do
    "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" \
        || missing+=("${packages[$module]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]} (never torch)"
    pip=("$python" -m pip install -q --disable-pip-version-check)
    if [ -d wheels ]; then
        timeout 120 "${pip[@]}" --no-index --find-links wheels "${missing[@]}" \
            || die "could not install ${missing[*]} from ./wheels; put their wheels there" \
                "(pip download ${missing[*]} -d wheels, on a machine with network)"
    else
        timeout 180 "${pip[@]}" "${missing[@]}" \
            || die "could not install ${missing[*]} (no network?); carry their wheels in" \
                "./wheels (pip download ${missing[*]} -d wheels) and rerun"
    fi
fi

mkdir -p "$out"
say "parity tests on $device (f32, bf16, f16 against transformers on the same device)"
parity_status=0
CAKE_TEST_DEVICE=$device timeout 240 "$python" -m pytest tests/test_device_parity.py -q \
    -p no:cacheprovider --junitxml "$out/parity.xml" >&2 || parity_status=$?
if [ "$parity_status" -eq 124 ]; then
    say "the parity tests ran past 240 s and were stopped"
fi

say "decode benchmark on $device: transformers, cake local, cake + 2 workers ($tokens tokens, $rounds rounds)"
bench_status=0
timeout 330 "$python" -m bench.gpu --device "$device" --tokens "$tokens" --rounds "$rounds" \
    --junit "$out/parity.xml" --out "$out" || bench_status=$?
if [ "$bench_status" -eq 124 ]; then
    say "the benchmark ran past 330 s and was stopped"
fi

say "quantized kernels and batched steps on $device"
quant_status=0
timeout 120 "$python" -m bench.gpu_quant --device "$device" | tee "$out/quant.md" || quant_status=$?

say "done in $((SECONDS - started)) s (parity exit $parity_status, benchmark exit $bench_status, quantized exit $quant_status)"
if [ "$parity_status" -ne 0 ] || [ "$bench_status" -ne 0 ] || [ "$quant_status" -ne 0 ]; then
    exit 1
fi
