"""The GPU check's benchmark and its one table (run by scripts/gpu_check.sh).

    python -m bench.gpu --device cuda:0 [--tokens 128] [--rounds 2] [--junit parity.xml]

Decode on the GPU as users run it, each configuration in its own process and timed from outside
(bench/streamed.py): transformers `generate`, cake local, cake master + 2 workers on 127.0.0.1
(all on the same GPU), on a random-weight model in the Llama 3.2 1B shape in bf16 (the real
Llama 3.2 tokenizer if installed, else bench/word_tokenizer.py's stand-in). With --junit, the
parity tests' results (pytest --junitxml) become rows of the same table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from bench.models import build_llama_1b_shape, find_llama3_tokenizer
from bench.streamed import measure_streamed
from cake.host.cache import cache_root

log = logging.getLogger("bench")


def parity_rows(junit: Path) -> list[list[str]]:
    """One row per parity test: its name and pass/FAIL/skipped."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            verdict = "**FAIL**"
        elif case.find("skipped") is not None:
            verdict = "skipped"
        else:
            verdict = "pass"
        name = case.get("name", "?")
        rows.append([f"parity: {case.get('classname', '').split('.')[-1]}::{name}", verdict])
    return rows


def gpu_name(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (compute {major}.{minor})"


def table(results: dict, parity: list[list[str]]) -> str:
    lines = [
        f"GPU check: {results['gpu']}, torch {results['torch']}, {results['tokens']} new "
        f"tokens, {results['rounds']} rounds, {results['model']}.",
        "",
        "| check | result | decode tok/s (outside) | vs baseline (median, best) | same text |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {verdict} | | | |" for name, verdict in parity]
    for label, c in results["streamed"]["configs"].items():
        tok_s = c["decode_tok_s"]
        ratio = c.get("decode_vs_baseline")
        versus = (
            "—"
            if ratio is None
            else f"{ratio['median']:.2f}× vs {c['baseline']} (best {ratio['best']:.2f}×)"
        )
        same = "yes" if c["same_text_as_transformers"] else "no"
        lines.append(
            f"| decode: {label} | measured | {tok_s['median']:.1f} "
            f"({tok_s['min']:.1f}–{tok_s['max']:.1f}) | {versus} | {same} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--junit", type=Path, default=None, help="pytest --junitxml of parity")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu"))
    parser.add_argument("--cache-dir", type=Path, default=cache_root() / "bench" / "gpu-1b-shape")
    options = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[%(asctime)s] %(message)s")
    device = torch.device(options.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        sys.exit(f"error: --device {options.device}: torch {torch.__version__} sees no CUDA GPU")
    folder = options.cache_dir
    if not (folder / "model.safetensors").is_file():
        build_llama_1b_shape(folder, word_tokenizer=find_llama3_tokenizer() is None)
    streamed = measure_streamed(
        folder,
        "Llama-3.2-1B shape, random (bf16)",
        "bf16",
        device=options.device,
        tokens=options.tokens,
        rounds=options.rounds,
        worker_counts=(2,),
        policies=False,
    )
    results = {
        "gpu": gpu_name(device),
        "torch": torch.__version__,
        "tokens": options.tokens,
        "rounds": options.rounds,
        "model": "Llama-3.2-1B shape, random weights, bf16",
        "streamed": streamed,
    }
    parity = parity_rows(options.junit) if options.junit and options.junit.is_file() else []
    text = table(results, parity)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "gpu.json").write_text(json.dumps({**results, "parity": parity}, indent=2))
    (options.out / "gpu.md").write_text(text, encoding="utf-8")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
