"""Every family cake runs, read from a GGUF file as llama.cpp's converter writes it.

Each family's random checkpoint (families.py; Llama from helpers.build_random_llama, with Llama
3's rotary scaling) is written as GGUF by gguf_files.py, in llama.cpp's layout (names, q/k
permutation, Gemma's 1 + w norms, 3-D expert tensors, rope factor tensors, metadata keys), and
cake reads it through its own metadata mapping (resolve_model_path) and tensor index:

- F32 files: logits equal transformers' run of the original safetensors checkpoint, to 1e-4.
- Q8_0 and Q4_0 files: every weight cake reads is the file's (gguf's own dequantization of the
  same bytes) within what cake's form allows (int4: scales and zeros rounded to bf16; int8: half
  a step of the row), and for each dense family (in one of the two types) the logits follow
  transformers' run of the file's weights: their RMS error at most 2x transformers' own bf16
  error on the same weights, the bound test_gguf_types.py holds a Q4_K_M file to (measured 0.3x
  to 1.6x here; cake runs in float32, so the comparison sees only what reading changes).
  Mixture-of-experts logits are not compared on quantized files: with random routers the last
  bit of a weight moves tokens to other experts (transformers' own bf16 run of the same weights
  measured 0.02-0.14 off), so the comparison would measure routing ties, not reading; their
  experts' weights are held to the bounds above one by one, and test_a_worker_reads_... checks
  that they stay int4, are read one by one and run only where routed.

Where a family's published options cannot be written as llama.cpp's converter writes them, the
checkpoint takes the nearest config it can (OVERRIDES, each with its reason).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from families import build_family, reference_model
from gguf import GGUFWriter, RopeScalingType
from gguf_files import write_gguf
from helpers import build_random_llama
from tokenizers import Tokenizer

from cake.errors import ModelFolderError
from cake.model.config import LlamaConfig
from cake.model.gguf import checkpoint as checkpoint_module
from cake.model.gguf import resolve_model_path
from cake.model.gguf.checkpoint import GGUFCheckpoint
from cake.model.gguf.header import read_header
from cake.model.kernels import probe
from cake.model.linear import describe
from cake.model.loader import load_llama
from cake.model.quant import QuantizedTensor
from cake.model.tokenizer import load_tokenizer

VOCAB = 256  # small tables: the vocabulary's size changes nothing GGUF-specific
OVERRIDES = {
    "llama": {},
    # llama.cpp's converter writes Mistral as `llama` and drops v0.1's window (llama.cpp runs it
    # without one); v0.2 and later publish none.
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    # llama.cpp fixes Gemma 3's pattern at one global layer in 6: six layers, the sixth global.
    "gemma3_text": {
        "num_hidden_layers": 6,
        "sliding_window_pattern": 6,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
    },
    "phi3": {},
    # llama.cpp's qwen3moe has experts in every block (its converter maps no dense MLP).
    "qwen3_moe": {"mlp_only_layers": []},
    "mixtral": {},
}
MOE = ("qwen3_moe", "mixtral")
# Logits on quantized files: each dense family once, the two types in turn (every weight of
# every family is checked in both types by test_quantized_gguf_weights_are_the_files).
QUANTIZED_RUNS = [
    (family, ("Q4_0", "Q8_0")[i % 2])
    for i, family in enumerate(f for f in OVERRIDES if f not in MOE)
]
TOKENS = torch.randint(VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))  # > windows
MAX_SEQ_LEN = 64  # under Phi-3's original context (128): its short LongRoPE factors, as theirs


@dataclass
class Original:
    folder: Path  # the safetensors checkpoint
    model: torch.nn.Module  # transformers' model of it, float32

    def logits(self, weights: dict[str, torch.Tensor] | None = None, dtype=None) -> torch.Tensor:
        """(T, V) float32 logits of transformers' run, on `weights` (as a file holds them) where
        given, in `dtype` where given."""
        model = self.model
        if weights is not None or dtype is not None:
            model = copy.deepcopy(model)
            model.load_state_dict(weights or {}, strict=False)
            model = model.to(dtype or torch.float32)
        with torch.inference_mode():
            return model(TOKENS).logits[0].float()


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Original]:
    """family -> its original checkpoint and transformers' model of it, built on first use."""
    root = tmp_path_factory.mktemp("gguf_families")

    class Built(dict):
        def __missing__(self, family: str) -> Original:
            folder = root / family / "hf"
            if family == "llama":
                build_random_llama(folder, vocab=VOCAB)
            else:
                no_ids = {"bos_token_id": None, "eos_token_id": None}  # Llama 3's, not in VOCAB
                overrides = {"vocab_size": VOCAB, **no_ids, **OVERRIDES[family]}
                build_family(folder, family, overrides=overrides)
            self[family] = Original(folder, reference_model(folder))
            return self[family]

    return Built()


@pytest.fixture(autouse=True)
def exact_kernels() -> None:
    """Quantized weights run on cake's dequantize-then-multiply kernel: an f32 product of the
    stored weights (what these tests compare), and no timing of every kernel on every shape."""
    probe.use("dequant-gemm")
    yield
    probe.use(probe.AUTO)


def cake_logits(gguf: Path) -> torch.Tensor:
    """(T, V) float32 logits of the whole model read from `gguf` through its metadata folder."""
    folder = resolve_model_path(gguf)
    part = load_llama(folder, range(_n_layers(folder)), True, True, max_seq_len=MAX_SEQ_LEN)
    with torch.inference_mode():
        hidden = part.run_blocks(part.embed(TOKENS), 0, part.new_cache(MAX_SEQ_LEN), part.blocks)
        return part.head(hidden)[0].float()


def _n_layers(folder: Path) -> int:
    return LlamaConfig.from_folder(folder).n_layers


@pytest.mark.parametrize("family", list(OVERRIDES))
def test_f32_gguf_logits_match_transformers(
    family: str, originals: dict[str, Original], tmp_path: Path
) -> None:
    original = originals[family]
    write_gguf(original.folder, tmp_path / "model.gguf", "F32")
    expected = original.logits()
    assert expected.std() > 0.5  # far from all-equal: agreement to 1e-4 means something
    torch.testing.assert_close(cake_logits(tmp_path / "model.gguf"), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
@pytest.mark.parametrize("family", list(OVERRIDES))
def test_quantized_gguf_weights_are_the_files(
    family: str, qtype: str, originals: dict[str, Original], tmp_path: Path
) -> None:
    """Each weight under its Hugging Face name (experts one by one, q/k un-permuted, Gemma's
    norms back to w) is gguf's dequantization of the file's bytes, within cake's form: int4
    copies Q4_0's codes (scales rounded to bf16: 2^-8 of a row's largest weight, 2^-7 here as
    test_quant does), int8 requantizes Q8_0 per row (half a step: amax / 254)."""
    folder = originals[family].folder
    held = write_gguf(folder, tmp_path / "model.gguf", qtype)
    checkpoint = GGUFCheckpoint(tmp_path / "model.gguf", *_heads(folder))
    assert set(checkpoint.entries) == set(held)
    loaded = checkpoint.load(list(held), None)
    for name, expected in held.items():
        ours = loaded[name]
        if not isinstance(ours, QuantizedTensor):  # norms, biases, routers: F32 as written
            torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0, msg=name)
            continue
        assert ours.describe() == ("int4/g32" if qtype == "Q4_0" else "int8"), name
        scale = expected.abs().amax(dim=1, keepdim=True)
        bound = scale * 2**-7 if qtype == "Q4_0" else scale / 254 * (1 + 2**-7)
        error = (ours.dequantize() - expected).abs()
        assert (error <= bound).all(), (name, (error / bound).max().item())


@pytest.mark.slow  # 1-2 s each: transformers runs twice (float32, bf16) besides cake
@pytest.mark.parametrize(("family", "qtype"), QUANTIZED_RUNS)
def test_quantized_gguf_logits_follow_transformers(
    family: str, qtype: str, originals: dict[str, Original], tmp_path: Path
) -> None:
    original = originals[family]
    held = write_gguf(original.folder, tmp_path / "model.gguf", qtype)
    expected = original.logits(held)
    theirs = original.logits(held, torch.bfloat16)
    ours = cake_logits(tmp_path / "model.gguf")

    def relative_rms(x: torch.Tensor) -> float:
        return ((x - expected).pow(2).mean().sqrt() / expected.std()).item()

    their_error = relative_rms(theirs)
    assert 0 < their_error < 0.05, their_error
    assert relative_rms(ours) <= 2 * their_error, (relative_rms(ours), their_error)


def _heads(folder: Path) -> tuple[int, int]:
    config = LlamaConfig.from_folder(folder)
    return config.n_heads, config.n_kv_heads


# --- experts: read one by one, kept quantized, run only where routed ---------------------------


def test_a_worker_reads_only_its_blocks_experts_and_keeps_them_int4(
    originals: dict[str, Original], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block 2 of a Q4_0 Qwen3-MoE file: the bytes read are exactly block 2's tensors, each
    expert's weight a slice of its stacked 3-D tensor (1/8 of it, at its index); every expert
    is int4 (its Q4_0 blocks mapped, or converted); a decode step runs the experts_per_token
    experts the router chose."""
    path = tmp_path / "model.gguf"
    write_gguf(originals["qwen3_moe"].folder, path, "Q4_0")
    folder = resolve_model_path(path)
    config = LlamaConfig.from_folder(folder)
    reads: list[tuple[int, int]] = []
    monkeypatch.setattr(checkpoint_module, "open", _recording_open(reads), raising=False)
    mapped = checkpoint_module.mapped_blocks

    def recording_map(path, kind, shape, offset, nbytes):
        reads.append((offset, nbytes))  # mapped where the kernels read blocks as stored
        return mapped(path, kind, shape, offset, nbytes)

    monkeypatch.setattr(checkpoint_module, "mapped_blocks", recording_map)
    part = load_llama(folder, [2], max_seq_len=MAX_SEQ_LEN)

    entries = GGUFCheckpoint(path, config.n_heads, config.n_kv_heads).entries
    block = {
        (offset, size) for name, (_, _, offset, size) in entries.items() if ".layers.2." in name
    }
    assert set(reads) == block and len(reads) == len(block)
    stacked = read_header(path).tensors["blk.2.ffn_gate_exps.weight"]
    each = stacked.nbytes // config.n_experts
    gates = sorted(
        entries[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"][2:] for e in range(8)
    )
    assert gates == [(stacked.offset + e * each, each) for e in range(config.n_experts)]

    moe = part.model.layers["2"].mlp
    kinds = {describe(p) for expert in moe.experts for p in (expert.gate_up, expert.down)}
    assert kinds in ({"q4_0 (mapped)"}, {"int4/g32"})  # as stored, or converted where no
    # kernel here reads the stored blocks
    ran: list[int] = []
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda module, args, out, e=e: ran.append(e))
    with torch.inference_mode():
        part.run_blocks(torch.randn(1, 1, config.hidden_size), 0, part.new_cache(8), [2])
    assert len(ran) == len(set(ran)) == config.experts_per_token


def _recording_open(reads: list[tuple[int, int]]):
    """open() whose files note every read as (offset, size)."""

    class Recording:
        def __init__(self, file) -> None:
            self.file = file

        def seek(self, *args) -> int:
            return self.file.seek(*args)

        def read(self, size: int) -> bytes:
            reads.append((self.file.tell(), size))
            return self.file.read(size)

        def __enter__(self) -> Recording:
            return self

        def __exit__(self, *exc) -> None:
            self.file.close()

    return lambda *args, **kwargs: Recording(open(*args, **kwargs))


# --- files cake refuses, each with what is wrong and what to do ---------------------------------


def tiny_gguf(path: Path, arch: str, tensors: tuple[str, ...] = (), **values) -> Path:
    """A one-block file of `arch` with the keys every model has, `values` (gguf writer method
    suffix -> value), and `tensors` (float32 zeros of a shape that does not matter here)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    for method, value in values.items():
        getattr(writer, f"add_{method}")(value)
    for name in ("token_embd.weight", *tensors):
        writer.add_tensor(name, np.zeros((16, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("arch", "tensors", "values", "message"),
    [
        ("gpt2", (), {}, "'gpt2'; cake reads these GGUF architectures: llama, qwen2, qwen3, "),
        ("llama", ("blk.0.ffn_gate.0.weight",), {}, "holds one expert on its own.*convert the"),
        ("llama", ("blk.0.ffn_gate_up_exps.weight",), {}, "fuses the experts' gate and up"),
        ("llama", ("blk.0.ffn_gate_shexp.weight",), {}, "is not part of a 'llama' model as cake"),
        ("qwen2", (), {"rope_scaling_type": RopeScalingType.YARN}, "YaRN rotary scaling"),
        ("phi3", (), {"head_count_kv": [2, 1]}, "head_count_kv differs between blocks"),
    ],
)
def test_a_gguf_file_cake_cannot_run_is_refused_with_the_reason(
    tmp_path: Path, arch: str, tensors: tuple[str, ...], values: dict, message: str
) -> None:
    path = tiny_gguf(tmp_path / "model.gguf", arch, tensors, **values)
    with pytest.raises(ModelFolderError, match=message):
        resolve_model_path(path)


def test_a_gguf_file_without_a_tokenizer_serves_workers_and_tells_the_master(
    tmp_path: Path,
) -> None:
    path = tiny_gguf(tmp_path / "model.gguf", "llama")
    folder = resolve_model_path(path)
    assert LlamaConfig.from_folder(folder).n_layers == 1  # a worker can open it
    with pytest.raises(ModelFolderError, match=r"model\.gguf: the file has no tokenizer"):
        load_tokenizer(folder)


# --- the tokenizer -------------------------------------------------------------------------------


@pytest.mark.slow  # converting Llama 3's 128k-token vocabulary and 280k merges takes ~5 s
def test_a_gguf_files_tokenizer_encodes_as_the_original(
    originals: dict[str, Original], tmp_path: Path, llama3_tokenizer_dir: Path
) -> None:
    """The Llama 3.2 tokenizer written as llama.cpp's converter writes a byte-level BPE one
    (tokens, token types, merges, special ids; Qwen's and SmolLM2's are of this kind) and read
    back from the metadata by transformers: the same ids as the original, the special ids in
    the config."""
    path = tmp_path / "model.gguf"
    write_gguf(originals["qwen2"].folder, path, "F32", tokenizer=llama3_tokenizer_dir)
    folder = resolve_model_path(path)
    ours = load_tokenizer(folder)
    theirs = Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    for text in (
        "The capital of France is Paris.",
        "  Leading spaces, tabs\tand\nnew lines\n\n, numbers 1234567 and émojis 🚀 ok?",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
    ):
        assert ours.encode(text) == theirs.encode(text).ids, text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    config = LlamaConfig.from_folder(folder)
    assert config.bos_token_id == 128000 and 128001 in config.eos_token_ids
