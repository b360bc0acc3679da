"""A worker needs no tokenizer: its process never imports `transformers` (~3 s of start-up and
a few hundred MB), whether it serves a model folder or a GGUF file with a tokenizer inside; nor
`huggingface_hub` (~0.1 s), which only fetching a model by its hub name needs.
Checked with the interpreter's own import log (`python -X importtime`) of a real worker process,
up to the moment it serves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from cake.cluster.local_cluster import WorkerProcess, worker_command

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["folder", "gguf"])
def test_a_worker_process_never_imports_transformers(
    model: str, tiny_llama: Path, smollm2_gguf: Path, tmp_path: Path
) -> None:
    path = tiny_llama if model == "folder" else smollm2_gguf
    topology = tmp_path / "topology.yml"
    topology.write_text(
        yaml.safe_dump({"w1": {"host": "127.0.0.1:1", "layers": ["model.layers.0-1"]}})
    )
    command = worker_command(path, "w1", topology, "127.0.0.1:0", ("--device", "cpu"))
    assert command[0] == sys.executable
    worker = WorkerProcess("w1", [command[0], "-X", "importtime", *command[1:]])
    try:
        worker.wait_ready()
    finally:
        worker.stop()
    imported = [line.split("|")[-1].strip() for line in worker.lines if "import time:" in line]
    assert "cake.worker" in imported and "torch" in imported  # the log is the real one
    heavy = {"transformers", "huggingface_hub"}
    assert not [name for name in imported if name.split(".")[0] in heavy]
