"""`--model ORG/NAME[@REVISION][:QUANT]`: models fetched from a Hugging Face hub.

The hub is tests/hub_server.py on loopback, and the client the real huggingface_hub, pointed at
it as a user would (HF_ENDPOINT, HF_HOME) with its cache in the test's folder. The request log
shows what each process fetched: config, tokenizer and index, then only the shards of its part.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import build_random_llama, greedy_tokens, run_cli
from hub_server import FakeHub, folder_files, request_lines
from huggingface_hub import constants
from safetensors.torch import load_file, save_file
from test_cli_errors import assert_one_error_line

from cake.cluster.local_cluster import start_local_cluster
from cake.cluster.setup import ClusterOptions, prepare_cluster
from cake.errors import ModelFolderError
from cake.faces.api import model_id
from cake.model.hub import HubName, fetch_model, gguf_file, hub_name
from cake.model.opener import open_model
from cake.split import split_model

REPO = "cake-test/tiny-llama"
GGUF_REPO = "cake-test/tiny-llama-GGUF"
# The checkpoint's three shards: the master's ends, and the blocks of two halves.
ENDS = "model-00001-of-00003.safetensors"  # embedding, final norm, head
FRONT = "model-00002-of-00003.safetensors"  # blocks 0-1
BACK = "model-00003-of-00003.safetensors"  # blocks 2-3
# What opening it fetches: config, generation config, tokenizer (its template too), the index.
SMALL = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
PROMPT = [5, 17, 42, 99, 7]

# A byte-level BPE vocabulary small enough to read in an instant (the models' tokenizer).
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE's base vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


TOKENS = [*SPECIALS, *byte_tokens(), *(merge.replace(" ", "") for merge in MERGES)]
TOKENS += [f"<|unused_{i}|>" for i in range(-len(TOKENS) % 32)]  # 288: GGUF rows of 32


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TOKENS)}
    bpe = Tokenizer(models.BPE(vocab, [tuple(merge.split()) for merge in MERGES]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=SPECIALS[1], eos_token=SPECIALS[2], chat_template=TEMPLATE
    )
    tokenizer.save_pretrained(folder)


def write_gguf(path: Path) -> Path:
    """A random 2-block Llama in GGUF (Q8_0 linear weights) with the tokenizer in its metadata."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    hidden, intermediate, heads, kv_heads, layers = 64, 128, 4, 2, 2
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(TOKENS))
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(TEMPLATE)
    q8_0 = GGMLQuantizationType.Q8_0

    def linear(name: str, rows: int, cols: int) -> None:
        weight = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
        writer.add_tensor(name, quantize(weight, q8_0), raw_dtype=q8_0)

    def norm(name: str) -> None:
        writer.add_tensor(name, rng.uniform(0.5, 1.5, size=hidden).astype(np.float32))

    linear("token_embd.weight", len(TOKENS), hidden)
    kv = kv_heads * hidden // heads
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        linear(f"blk.{i}.attn_q.weight", hidden, hidden)
        linear(f"blk.{i}.attn_k.weight", kv, hidden)
        linear(f"blk.{i}.attn_v.weight", kv, hidden)
        linear(f"blk.{i}.attn_output.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        linear(f"blk.{i}.ffn_gate.weight", intermediate, hidden)
        linear(f"blk.{i}.ffn_up.weight", intermediate, hidden)
        linear(f"blk.{i}.ffn_down.weight", hidden, intermediate)
    norm("output_norm.weight")
    linear("output.weight", len(TOKENS), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reshard(folder: Path) -> None:
    """model.safetensors -> ENDS, FRONT and BACK, with the index that names them."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()

    def shard_of(name: str) -> str:
        if not name.startswith("model.layers."):
            return ENDS
        return FRONT if int(name.split(".")[2]) < 2 else BACK

    weight_map = {name: shard_of(name) for name in sorted(tensors)}
    for shard in (ENDS, FRONT, BACK):
        part = {name: tensor for name, tensor in tensors.items() if weight_map[name] == shard}
        save_file(part, folder / shard, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-block Llama in three shards, with its tokenizer and files no run needs."""
    folder = build_random_llama(tmp_path_factory.mktemp("repo"), vocab=len(TOKENS), rope="default")
    reshard(folder)
    write_tokenizer(folder)
    (folder / "README.md").write_text("# tiny llama\n")
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.00.pth").write_bytes(b"not for cake")
    return folder


@pytest.fixture(scope="module")
def gguf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GGUF repository: the Q8_0 file, a Q4_K_M one no test may fetch, a projector."""
    folder = tmp_path_factory.mktemp("gguf_repo")
    write_gguf(folder / "tiny-llama-Q8_0.gguf")
    (folder / "tiny-llama-Q4_K_M.gguf").write_bytes(b"never fetched")
    (folder / "mmproj-tiny-llama-f16.gguf").write_bytes(b"never fetched")
    (folder / "README.md").write_text("# tiny llama, GGUF\n")
    return folder


def use_hub(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Point huggingface_hub at `url`, its cache in `home` (a machine of its own), here and in
    the processes the test starts."""
    for name in ("HF_TOKEN", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", str(home))
    # huggingface_hub read those variables into its constants when it was imported.
    monkeypatch.setattr(constants, "ENDPOINT", url)
    template = url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agents.json"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(
    model_folder: Path, gguf_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeHub]:
    """The hub serving REPO and GGUF_REPO; this process fetches into tmp_path/hf."""
    with FakeHub() as server:
        server.add(REPO, folder_files(model_folder), refs=("main", "v1"))
        server.add(GGUF_REPO, folder_files(gguf_folder))
        use_hub(monkeypatch, server.url, tmp_path / "hf")
        yield server


def shards_fetched(hub: FakeHub, since: int = 0) -> list[str]:
    return [file for file in hub.fetched(REPO)[since:] if file.endswith(".safetensors")]


def test_a_worker_and_a_master_fetch_only_their_shards(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each process on a machine of its own: the worker of blocks 2-3 fetches BACK only; the
    master (ends, blocks 0-1) ENDS and FRONT; a file no run reads is never fetched."""
    worker = open_model(REPO)
    assert sorted(hub.fetched(REPO)) == SMALL
    worker.load(worker.compute("cpu", "f32"), [2, 3])
    assert shards_fetched(hub) == [BACK]

    use_hub(monkeypatch, hub.url, tmp_path / "master-machine")
    seen = len(hub.fetched(REPO))
    master = open_model(REPO)
    part = master.load(master.compute("cpu", "f32"), [0, 1], with_ends=True)
    assert sorted(shards_fetched(hub, seen)) == [ENDS, FRONT]
    assert sorted(part.blocks) == [0, 1]
    assert "original/consolidated.00.pth" not in hub.fetched(REPO)
    assert "README.md" not in hub.fetched(REPO)


def test_split_fetches_only_the_shards_of_its_bundles(hub: FakeHub, tmp_path: Path) -> None:
    topology = tmp_path / "topology.yml"
    topology.write_text(yaml.safe_dump({"w": {"host": "h:1", "layers": ["model.layers.2-3"]}}))
    bundles = split_model(REPO, topology, tmp_path / "out", workers=["w"])
    assert shards_fetched(hub) == [BACK]
    stored = load_file(bundles["w"] / "model-00001-of-00001.safetensors")
    assert {name.split(".")[2] for name in stored} == {"2", "3"}


def test_a_master_that_pushes_to_empty_workers_fetches_every_shard(hub: FakeHub) -> None:
    """It hashes every tensor and sends the workers theirs: all shards, before any worker is
    asked anything (here there is none to ask)."""
    options = ClusterOptions(workers=[], cluster_key=b"k" * 32, device="cpu", dtype="f32")
    with pytest.raises(ValueError, match="no workers to plan for"):
        asyncio.run(prepare_cluster(REPO, options))
    assert sorted(shards_fetched(hub)) == [ENDS, FRONT, BACK]


def test_a_revision_pins_every_file_to_one_commit(hub: FakeHub, model_folder: Path) -> None:
    """Shards fetched after main moved on come from the commit that was opened; a tag or a
    commit names what it names, whatever main says."""
    first = hub.repos[REPO].refs["main"]
    opened = open_model(REPO)
    assert opened.folder.name == first
    second = hub.add(REPO, folder_files(model_folder))  # main moves on
    seen = len(hub.log)
    opened.load(opened.compute("cpu", "f32"), [0])
    fetches = [r.path for r in hub.log[seen:] if r.file]
    assert fetches, "block 0's shard was fetched"
    assert all(f"/resolve/{first}/" in path for path in fetches), fetches

    assert open_model(REPO).folder.name == second
    assert open_model(f"{REPO}@{first}").folder.name == first
    assert open_model(f"{REPO}@v1").folder.name == first
    with pytest.raises(ModelFolderError, match="has no revision 'v9'; name a branch, tag or"):
        open_model(f"{REPO}@v9")


def test_quant_tag_fetches_one_gguf_file(hub: FakeHub, gguf_folder: Path) -> None:
    """`:q8_0` (any case) fetches that file alone; a tag no file has, or no tag on a repository
    of GGUF files, says which tags there are."""
    path, shards = fetch_model(HubName(GGUF_REPO, quant="q8_0"))
    assert hub.fetched(GGUF_REPO) == ["tiny-llama-Q8_0.gguf"]
    assert path.read_bytes() == (gguf_folder / "tiny-llama-Q8_0.gguf").read_bytes()
    assert shards is None
    with pytest.raises(ModelFolderError, match=r"no \.gguf file of \S+ has the tag Q5_K; its tags"):
        open_model(f"{GGUF_REPO}:Q5_K")
    tags = "Q4_K_M, Q8_0"
    with pytest.raises(ModelFolderError, match=rf"--model {GGUF_REPO}:Q4_K_M \(tags: {tags}\)"):
        open_model(GGUF_REPO)  # no config.json: a GGUF repository needs a tag
    assert hub.fetched(GGUF_REPO) == ["tiny-llama-Q8_0.gguf"]


@pytest.mark.slow
def test_a_gguf_from_the_hub_runs_as_the_local_file(hub: FakeHub, gguf_folder: Path) -> None:
    local = gguf_folder / "tiny-llama-Q8_0.gguf"
    opened = open_model(f"{GGUF_REPO}:Q8_0")
    assert opened.name == f"{GGUF_REPO}:Q8_0"
    assert opened.config == open_model(local).config
    assert greedy_tokens(f"{GGUF_REPO}:Q8_0", PROMPT, 6) == greedy_tokens(local, PROMPT, 6)
    assert hub.fetched(GGUF_REPO) == ["tiny-llama-Q8_0.gguf"]  # once


@pytest.mark.parametrize(
    ("quant", "chosen"),
    [("q4_k_m", "m-Q4_K_M.gguf"), ("Q8_0", "sub/m.Q8_0.gguf"), ("f16", "m-F16.gguf")],
)
def test_gguf_file_is_chosen_by_its_tag(quant: str, chosen: str) -> None:
    files = ["README.md", "m-Q4_K_M.gguf", "sub/m.Q8_0.gguf", "m-F16.gguf", "mmproj-m-F16.gguf"]
    assert gguf_file(HubName("o/m", quant=quant), files) == chosen


def test_gguf_file_refuses_an_unknown_tag_several_files_and_split_files() -> None:
    files = ["a-Q4_K_M.gguf", "b-Q4_K_M.gguf", "a-Q2_K-00001-of-00002.gguf", "a.Q8_0.gguf"]
    cases = {
        "Q5_K": "no .gguf file of o/m has the tag Q5_K; its tags: Q2_K, Q4_K_M, Q8_0",
        "Q4_K_M": "2 .gguf files of o/m have the tag Q4_K_M (a-Q4_K_M.gguf, b-Q4_K_M.gguf)",
        "q2_k": "o/m holds q2_k as a split GGUF (a-Q2_K-00001-of-00002.gguf, ...); cake reads",
    }
    for quant, message in cases.items():
        with pytest.raises(ModelFolderError) as raised:
            gguf_file(HubName("o/m", quant=quant), files)
        assert message in str(raised.value)
    with pytest.raises(ModelFolderError, match=r"o/m has no \.gguf file; name it without :Q8_0"):
        gguf_file(HubName("o/m", quant="Q8_0"), ["model.safetensors", "config.json"])


def test_offline_runs_from_the_cache_and_names_what_is_not_there(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = open_model(REPO)
    online.load(online.compute("cpu", "f32"), [2, 3])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    seen = len(hub.log)

    offline = open_model(REPO)
    assert offline.folder == online.folder
    offline.load(offline.compute("cpu", "f32"), [2, 3])
    with pytest.raises(ModelFolderError) as raised:
        offline.load(offline.compute("cpu", "f32"), [0, 1], with_ends=True)
    assert f"HF_HUB_OFFLINE is set and the cache ({constants.HF_HUB_CACHE}) lacks {ENDS}, " in str(
        raised.value
    )
    assert FRONT in str(raised.value)
    with pytest.raises(ModelFolderError, match=r"HF_HUB_OFFLINE is set .* lacks the file list of"):
        open_model(f"{GGUF_REPO}:Q8_0")
    assert len(hub.log) == seen, "offline: no request"


def test_a_missing_or_gated_repository_or_no_network_is_one_clear_line(
    hub: FakeHub, model_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_cli("--model", "cake-test/no-such-model", "--prompt", "hi", "-n", "1")
    assert_one_error_line(
        result,
        "cake-test/no-such-model: no such local folder or file, and the Hugging Face hub",
        "has no model repository cake-test/no-such-model you may read: check the name",
        "HF_TOKEN",
    )

    hub.add("cake-test/gated", folder_files(model_folder), token="hf_granted")
    for token in (None, "hf_other"):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(ModelFolderError, match="a gated repository: accept its conditions"):
            open_model("cake-test/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_granted")
    granted = open_model("cake-test/gated")
    monkeypatch.delenv("HF_TOKEN")
    assert open_model("cake-test/gated").folder == granted.folder  # cached: as any hub client

    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    use_hub(monkeypatch, closed, model_folder.parent / "no-network")
    with pytest.raises(ModelFolderError, match=r"cannot reach the Hugging Face hub \(http://"):
        open_model(REPO)


def test_download_bars_show_on_a_terminal_only(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream, switch, drawn in [
        (io.StringIO(), "1", False),
        (Terminal(), "0", False),
        (Terminal(), "1", True),
    ]:
        use_hub(monkeypatch, hub.url, tmp_path / f"hf-{len(hub.log)}")  # fetch afresh
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setenv("CAKE_PROGRESS", switch)
        open_model(REPO)
        if drawn:
            assert f"Fetching {len(SMALL)} files" in stream.getvalue()
        else:
            assert stream.getvalue() == ""


def test_hub_names_and_local_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub_name("org/name") == HubName("org/name")
    assert hub_name("org/name@refs/pr/1") == HubName("org/name", "refs/pr/1")
    assert hub_name("org/my.model-v2@v1.0:q4_k_m") == HubName("org/my.model-v2", "v1.0", "q4_k_m")
    for not_a_name in ("name", "./org/name", "/org/name", "org/name/x", "org/name:", "org/na me"):
        assert hub_name(not_a_name) is None, not_a_name
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_name("org/name") is None  # a local folder wins
    assert model_id("bartowski/Llama-3.2-1B-Instruct-GGUF@main:Q4_K_M") == (
        "bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"
    )


@pytest.mark.slow
def test_a_cluster_from_the_hub_generates_what_the_local_folder_does(
    hub: FakeHub, model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker process (HF_ENDPOINT, its own HF_HOME) serves blocks 2-3 and fetched only
    their shard; the master fetched the other two; the text is the local folder's."""
    topology = tmp_path / "topology.yml"
    env = {**os.environ, "HF_HOME": str(tmp_path / "worker-machine"), "PYTHONUNBUFFERED": "1"}
    workers = start_local_cluster(REPO, {"w": ["model.layers.2-3"]}, topology, env=env)
    try:
        assert shards_fetched(hub) == [BACK], "\n".join(request_lines(hub))
        seen = len(hub.fetched(REPO))
        tokens = greedy_tokens(REPO, PROMPT, 8, topology=topology)
        assert sorted(shards_fetched(hub, seen)) == [ENDS, FRONT]
    finally:
        for worker in workers:
            worker.stop()
    assert tokens == greedy_tokens(model_folder, PROMPT, 8)
