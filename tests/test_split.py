"""cake-split-model: each bundle holds exactly its tensors, byte for byte, and runs as it is."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import build_random_llama, run_cli
from safetensors import safe_open
from safetensors.torch import save_file

import cake.split
from cake.cli import split_main
from cake.cluster.local_cluster import WorkerProcess, worker_command
from cake.errors import ModelFolderError
from cake.model.checkpoint import INDEX_FILE, Checkpoint
from cake.model.config import LlamaConfig
from cake.model.gguf import resolve_model_path
from cake.model.layout import EMBEDDING, HEAD
from cake.model.loader import load_llama
from cake.split import SHARD_FILE, split_model
from cake.topology import TopologyError, load_topology

NORM = "model.norm.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def write_topology(path: Path, layers: dict[str, str], ports: dict[str, int] | None = None) -> Path:
    ports = ports or {}
    spec = {
        name: {"host": f"127.0.0.1:{ports.get(name, 10128 + i)}", "layers": [entry]}
        for i, (name, entry) in enumerate(layers.items())
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every safetensors file of `folder`, as stored (dtype untouched)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert name not in tensors, f"{name} stored twice in {folder}"
                tensors[name] = f.get_tensor(name)
    return tensors


def assert_bytes_equal(bundle: Path, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bundle's tensors are a subset of `source`, with the same dtype, shape and bytes."""
    tensors = stored(bundle)
    for name, tensor in tensors.items():
        original = source[name]
        assert (tensor.dtype, tensor.shape) == (original.dtype, original.shape), name
        assert torch.equal(
            tensor.reshape(-1).view(torch.uint8), original.reshape(-1).view(torch.uint8)
        ), name
    return tensors


def block_tensors(source: dict[str, torch.Tensor], blocks: list[int]) -> set[str]:
    return {name for name in source if any(name.startswith(f"model.layers.{b}.") for b in blocks)}


def run_split(model: Path, topology: Path, out: Path, *extra: str):  # -> click Result
    args = ["--model-path", str(model), "--topology", str(topology), "--output", str(out), *extra]
    return CliRunner().invoke(split_main, args)


@pytest.fixture(scope="module")
def split_tiny(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama (4 blocks, untied): w1 serves blocks 0-1, w2 block 2, the master block 3."""
    tmp = tmp_path_factory.mktemp("split_tiny")
    topology = write_topology(
        tmp / "topology.yml", {"w1": "model.layers.0-1", "w2": "model.layers.2"}
    )
    split_model(tiny_llama, topology, tmp / "out")
    return tmp / "out"


def test_bundles_hold_exactly_their_tensors_byte_for_byte(
    tiny_llama: Path, split_tiny: Path
) -> None:
    source = stored(tiny_llama)
    assert sorted(p.name for p in split_tiny.iterdir()) == ["master", "w1", "w2"]
    w1 = assert_bytes_equal(split_tiny / "w1", source)
    w2 = assert_bytes_equal(split_tiny / "w2", source)
    master = assert_bytes_equal(split_tiny / "master", source)
    assert set(w1) == block_tensors(source, [0, 1])
    assert set(w2) == block_tensors(source, [2])
    assert set(master) == {EMBEDDING, NORM, HEAD} | block_tensors(source, [3])
    # Between them the bundles hold the whole model, each tensor once.
    assert sorted([*w1, *w2, *master]) == sorted(source)


def test_bundle_files_and_index(tiny_llama: Path, split_tiny: Path) -> None:
    for name in ("w1", "w2", "master"):
        bundle = split_tiny / name
        expected = {"config.json", "generation_config.json", *TOKENIZER_FILES}
        assert {p.name for p in bundle.iterdir()} == expected | {
            SHARD_FILE,
            INDEX_FILE,
            "topology.yml",
        }
        for file in expected:
            assert (bundle / file).read_bytes() == (tiny_llama / file).read_bytes(), file
        index = json.loads((bundle / INDEX_FILE).read_text())
        tensors = stored(bundle)
        assert index["weight_map"] == dict.fromkeys(tensors, SHARD_FILE)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        assert index["metadata"]["total_size"] == total


def test_bundle_topologies(split_tiny: Path) -> None:
    full = load_topology(split_tiny / "master" / "topology.yml")
    assert [(n.name, n.blocks) for n in full.nodes] == [("w1", (0, 1)), ("w2", (2,))]
    assert full.master_blocks(4) == [3]
    for name in ("w1", "w2"):
        own = load_topology(split_tiny / name / "topology.yml")
        assert own.nodes == (full.node(name),)  # host, port and blocks unchanged


def test_bundles_load_with_cakes_loaders(tiny_llama: Path, split_tiny: Path) -> None:
    """What `cake-cli --mode worker` and the master do with a bundle: loaded parts == whole."""
    n_layers = LlamaConfig.from_folder(tiny_llama).n_layers
    for name in ("w1", "w2"):
        bundle = split_tiny / name
        node = load_topology(bundle / "topology.yml").node(name)
        load_topology(bundle / "topology.yml").check_fits(LlamaConfig.from_folder(bundle).n_layers)
        assert Checkpoint(bundle).files == [SHARD_FILE]
        part = load_llama(bundle, node.blocks).state_dict()
        whole = load_llama(tiny_llama, node.blocks).state_dict()
        assert part.keys() == whole.keys()
        for key in part:
            assert torch.equal(part[key], whole[key]), key
    master_blocks = load_topology(split_tiny / "master" / "topology.yml").master_blocks(n_layers)
    part = load_llama(split_tiny / "master", master_blocks, True, True).state_dict()
    whole = load_llama(tiny_llama, master_blocks, True, True).state_dict()
    assert part.keys() == whole.keys()
    for key in part:
        assert torch.equal(part[key], whole[key]), key


def test_tied_head_is_stored_once(tiny_llama_tied: Path, tmp_path: Path) -> None:
    """Tied: the master gets the embedding (which is the head) and the norm, no lm_head."""
    topology = write_topology(tmp_path / "t.yml", {"w1": "model.layers.0-4"})
    split_model(tiny_llama_tied, topology, tmp_path / "out")
    master = assert_bytes_equal(tmp_path / "out" / "master", stored(tiny_llama_tied))
    assert set(master) == {EMBEDDING, NORM}
    part = load_llama(tmp_path / "out" / "master", [], with_embedding=True, with_head=True)
    vocab = master[EMBEDDING].shape[0]
    assert torch.equal(part.head_proj.rows(torch.arange(vocab)), master[EMBEDDING])


def test_sharded_bf16_checkpoint_keeps_bf16(tmp_path: Path) -> None:
    model = build_random_llama(tmp_path / "model", shard=True, dtype=torch.bfloat16)
    assert len(Checkpoint(model).files) >= 3
    topology = write_topology(tmp_path / "t.yml", {"a": "model.layers.1-2", "b": "model.layers.0"})
    split_model(model, topology, tmp_path / "out")
    source = stored(model)
    assert {t.dtype for t in source.values()} == {torch.bfloat16}
    seen = []
    for name, blocks in (("a", [1, 2]), ("b", [0])):
        tensors = assert_bytes_equal(tmp_path / "out" / name, source)
        assert set(tensors) == block_tensors(source, blocks)
        seen += tensors
    master = assert_bytes_equal(tmp_path / "out" / "master", source)
    assert set(master) == {EMBEDDING, NORM, HEAD} | block_tensors(source, [3])
    assert sorted([*seen, *master]) == sorted(source)
    # No tokenizer in the source, so none in the bundles.
    assert not any((tmp_path / "out" / "a" / f).exists() for f in TOKENIZER_FILES)


def test_worker_option_writes_only_the_named_bundles(tiny_llama: Path, tmp_path: Path) -> None:
    topology = write_topology(
        tmp_path / "t.yml", {"w1": "model.layers.0-1", "w2": "model.layers.2"}
    )
    out = tmp_path / "out"
    result = run_split(tiny_llama, topology, out, "--worker", "w2", "--worker", "w2")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["w2"]
    assert set(stored(out / "w2")) == block_tensors(stored(tiny_llama), [2])


@pytest.mark.slow
def test_gguf_model_path(
    smollm2_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .gguf --model-path is split block by block with its tensors kept quantized (Q4_1 as
    int4), and the bundle's block equals the same block read (and converted, as the bundle's
    was: not run from the mapped blocks, whose f16 scales the int4 form rounds to bf16) from
    the file."""
    monkeypatch.setenv("CAKE_NO_MMAP", "1")
    topology = write_topology(tmp_path / "t.yml", {"w": "model.layers.3"})
    bundles = split_model(smollm2_gguf, topology, tmp_path / "out", workers=["w"])
    assert list(bundles) == ["w"]
    names = set(stored(bundles["w"]))
    assert "model.layers.3.mlp.down_proj.weight.q" in names
    assert not any(name.startswith("model.layers.2.") for name in names)
    assert (bundles["w"] / "tokenizer_config.json").is_file()
    assert not (bundles["w"] / "gguf.json").exists()
    x = torch.randn(1, 2, 576, dtype=torch.bfloat16)
    outputs = []
    for folder in (bundles["w"], smollm2_gguf):
        part = load_llama(resolve_model_path(folder), [3], dtype=torch.bfloat16)
        with torch.inference_mode():
            outputs.append(part.run_blocks(x, 0, part.new_cache(8), [3]))
    assert torch.equal(outputs[0], outputs[1])


# --- errors: a clear message, and nothing written ---------------------------------------------


def test_unknown_worker_lists_the_names(tiny_llama: Path, tmp_path: Path) -> None:
    topology = write_topology(
        tmp_path / "t.yml", {"w1": "model.layers.0-1", "w2": "model.layers.2"}
    )
    result = run_split(tiny_llama, topology, tmp_path / "out", "--worker", "w3")
    assert result.exit_code == 1
    assert "error: " in result.output
    assert "no node named 'w3'; known nodes: 'w1', 'w2'" in result.output
    assert not (tmp_path / "out").exists()


def test_existing_bundle_needs_force(tiny_llama: Path, tmp_path: Path) -> None:
    topology = write_topology(tmp_path / "t.yml", {"w1": "model.layers.0-1"})
    out = tmp_path / "out"
    (out / "w1").mkdir(parents=True)
    (out / "w1" / "old.txt").write_text("keep me")
    result = run_split(tiny_llama, topology, out)
    assert result.exit_code == 1
    assert f"error: {out / 'w1'} already exists; pass --force" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["w1"]  # no master written, w1 untouched
    assert (out / "w1" / "old.txt").read_text() == "keep me"

    result = run_split(tiny_llama, topology, out, "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["master", "w1"]  # no staging left over
    assert not (out / "w1" / "old.txt").exists()
    assert set(stored(out / "w1")) == block_tensors(stored(tiny_llama), [0, 1])


def test_topology_beyond_the_model(tiny_llama: Path, tmp_path: Path) -> None:
    topology = write_topology(tmp_path / "t.yml", {"w1": "model.layers.2-5"})
    with pytest.raises(TopologyError, match=r"node 'w1': block 4 does not exist: the model has 4"):
        split_model(tiny_llama, topology, tmp_path / "out")
    result = run_split(tiny_llama, topology, tmp_path / "out")
    assert result.exit_code == 1 and "error: " in result.output and "block 4" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [("master", "would share the master bundle's folder"), ("../up", "cannot be a folder name")],
)
def test_node_names_that_cannot_be_bundle_folders(
    tiny_llama: Path, tmp_path: Path, name: str, message: str
) -> None:
    topology = write_topology(tmp_path / "t.yml", {name: "model.layers.0"})
    with pytest.raises(ValueError, match=message):
        split_model(tiny_llama, topology, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    return build_random_llama(tmp_path / "model", vocab=128)


def test_missing_tensor_names_it_and_the_file(small_model: Path, tmp_path: Path) -> None:
    missing = "model.layers.2.mlp.up_proj.weight"
    tensors = stored(small_model)
    del tensors[missing]
    save_file(tensors, str(small_model / "model.safetensors"), metadata={"format": "pt"})
    topology = write_topology(
        tmp_path / "t.yml", {"w1": "model.layers.0-1", "w2": "model.layers.2"}
    )
    out = tmp_path / "out"
    with pytest.raises(ModelFolderError) as error:
        split_model(small_model, topology, out)
    assert repr(missing) in str(error.value)
    assert "worker 'w2'" in str(error.value)
    assert str(small_model / "model.safetensors") in str(error.value)
    assert not out.exists() or not any(out.iterdir())


def test_tensor_missing_from_its_shard(tmp_path: Path) -> None:
    """The index names a shard that lacks the tensor: the message names the shard."""
    model = build_random_llama(tmp_path / "model", vocab=128, shard=True)
    index = json.loads((model / INDEX_FILE).read_text())
    missing = "model.layers.1.self_attn.q_proj.weight"
    shard = index["weight_map"][missing]
    with safe_open(str(model / shard), framework="pt") as f:
        kept = {name: f.get_tensor(name) for name in f.keys() if name != missing}  # noqa: SIM118
    save_file(kept, str(model / shard), metadata={"format": "pt"})
    topology = write_topology(tmp_path / "t.yml", {"w1": "model.layers.0-1"})
    with pytest.raises(ModelFolderError, match=rf"{missing!r}.*missing from {model / shard}"):
        split_model(model, topology, tmp_path / "out", workers=["w1"])


def test_failure_mid_write_leaves_output_as_it_was(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = write_topology(
        tmp_path / "t.yml", {"w1": "model.layers.0-1", "w2": "model.layers.2"}
    )
    out = tmp_path / "out"
    split_model(small_model, topology, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_copy, calls = cake.split._copy_range, []

    def failing_copy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 30:  # in the master bundle: the workers' are complete by then
            raise OSError("disk full")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(cake.split, "_copy_range", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        split_model(small_model, topology, out, force=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # old bundles intact, no staging folder left


# --- end to end: workers and master run from copies of the bundles alone ----------------------


@pytest.mark.slow
def test_bundles_run_without_the_original_model(tiny_llama: Path, tmp_path: Path) -> None:
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    layers = {"w1": "model.layers.0-1", "w2": "model.layers.2"}
    topology = write_topology(tmp_path / "t.yml", layers)
    split_model(model, topology, tmp_path / "out")
    bundles = shutil.copytree(tmp_path / "out", tmp_path / "copied")
    shutil.rmtree(model)  # nothing may reach back into the source folder
    shutil.rmtree(tmp_path / "out")

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    workers = []
    try:
        for name in layers:
            args = worker_command(
                bundles / name,
                name,
                bundles / name / "topology.yml",
                address="127.0.0.1:0",  # each picks a free port and reports it
                extra=["--device", "cpu"],
            )
            workers.append(WorkerProcess(name, args, env))
        for worker in workers:
            worker.wait_ready(timeout=60)
        ports = {worker.name: worker.port for worker in workers}
        write_topology(bundles / "master" / "topology.yml", layers, ports)
        generate = ["--prompt", "hi", "--temperature", "0", "-n", "12", "--ignore-eos"]
        generate += ["--device", "cpu"]
        # The master: cake-cli in this process (the workers are processes of their own).
        split = run_cli(
            "--model",
            str(bundles / "master"),
            "--topology",
            str(bundles / "master" / "topology.yml"),
            *generate,
        )
        local = run_cli("--model", str(tiny_llama), *generate)
    finally:
        for worker in workers:
            worker.stop()
    assert split.exit_code == 0, split.stderr
    assert local.exit_code == 0, local.stderr
    assert split.stdout == local.stdout
    assert split.stdout.strip()
    assert "round trips/token: 2.00" in split.stderr
