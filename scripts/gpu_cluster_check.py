"""Device check: an empty worker on CUDA is measured, pushed to, assigned, and serves forwards.

    python3 scripts/gpu_cluster_check.py        # on a machine with a CUDA GPU
    python3 scripts/gpu_cluster_check.py cpu    # a dry run of the same steps on the CPU

Builds a small random Llama checkpoint with safetensors (no transformers model needed), starts
an EmptyWorker on cuda:0 in this process, runs the master's prepare_cluster against it (dtype
auto: bf16 there), then sends hidden states through its blocks with an ordinary WorkerClient and
compares them with the same blocks run on the CPU in float32. A second prepare_cluster must push
nothing. Prints what the worker reported (free memory, speed, block time) and the error.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cake.cluster.empty_worker import EmptyWorker
from cake.cluster.push import ModelCache
from cake.cluster.setup import ClusterOptions, prepare_cluster
from cake.model.config import LlamaConfig, architecture_of
from cake.model.llama import checkpoint_shapes
from cake.model.loader import load_llama
from cake.wire.protocol import fingerprint_config
from cake.wire.worker_link import WorkerClient

KEY = b"gpu-check-key"
SEQ_LEN = 128
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def build(folder: Path) -> LlamaConfig:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    config = LlamaConfig.from_folder(folder)
    shapes = checkpoint_shapes(config, range(config.n_layers), True, True)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: (
            torch.rand(shape, generator=generator) + 0.5
            if name.endswith("norm.weight")
            else torch.randn(shape, generator=generator) * 0.05
        ).to(torch.bfloat16)
        for name, shape in shapes.items()
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return config


async def check(folder: Path, config: LlamaConfig, scratch: Path, device: torch.device) -> None:
    empty = EmptyWorker("gpu-worker", ModelCache(scratch / "cache"), KEY, device)
    described = empty.describe(0)
    print(
        f"worker: {described.device}, offers {described.free_memory / 2**30:.1f} GiB of "
        f"{described.total_memory / 2**30:.1f} GiB, {described.matmul_mflops / 1e6:.1f} TFLOP/s "
        "(f32 512x512 matmul)"
    )
    server = await asyncio.start_server(empty.handle_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    options = ClusterOptions(
        workers=[f"127.0.0.1:{port}"],
        cluster_key=KEY,
        device="cpu",
        dtype="auto",
        max_seq_len=SEQ_LEN,
        master_blocks=0,
    )
    try:
        plan = await prepare_cluster(str(folder), options)
        (node,) = plan.topology.nodes
        print(f"plan: {plan.summary}")
        print(f"pushed: {plan.pushed[node.name].bytes_sent} bytes")
        client = WorkerClient(node, fingerprint_config(architecture_of(config)), cluster_key=KEY)
        welcome = await client.connect()
        print(f"serving: blocks {list(welcome.blocks)} on {welcome.device} as {welcome.dtype}")
        hidden = torch.randn(1, 9, config.hidden_size, generator=torch.Generator().manual_seed(1))
        result = await client.forward("s1", 0, range(config.n_layers), hidden)
        await client.close()
        reference_model = load_llama(folder, range(config.n_layers), max_seq_len=SEQ_LEN)
        with torch.inference_mode():
            reference = reference_model.run_blocks(
                hidden, 0, reference_model.new_cache(SEQ_LEN), range(config.n_layers)
            )
        error = float((result.hidden - reference).abs().max() / reference.abs().max())
        print(f"max error vs CPU f32, relative to the largest value: {error:.4f}")
        if device.type == "cuda":
            assert welcome.device.startswith("cuda") and welcome.dtype == "bf16", welcome
        assert error < 0.05, error
        again = await prepare_cluster(str(folder), options)
        assert [s.bytes_sent for s in again.pushed.values()] == [0], again.pushed
        print("second run pushed 0 bytes")
        print("GPU CLUSTER CHECK OK")
    finally:
        server.close()
        empty.close()


def main() -> None:
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda:0")  # "cpu": a dry run
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        config = build(folder)
        asyncio.run(check(folder, config, Path(scratch), device))


if __name__ == "__main__":
    main()
