"""Every model family against transformers, in every mode: random checkpoints of published
configs (tests/families.py), f32 logits over a prefill and cached decode steps, identical greedy
tokens locally and over two workers, split bundles that load to the same parts, and quantized
weights within bounds. Mixture-of-experts: a decode step runs only the routed experts, batched
rows and speculative verification equal plain decoding."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from cluster import GREEDY, cluster
from families import FAMILIES, build_family, reference_model
from helpers import greedy_tokens, run_cli

from cake.decoding.draft import DraftModel
from cake.decoding.speculative import DraftSettings
from cake.decoding.stats import GenerationStats
from cake.master import Master, MasterSettings
from cake.model.config import LlamaConfig
from cake.model.kernels import native, probe
from cake.model.kv_cache import Segment
from cake.model.llama import Llama, SparseMoE
from cake.model.loader import load_llama
from cake.model.quant import Quantization
from cake.split import split_model
from cake.topology import load_topology

# Every test here builds or runs whole models of seven families (~1 min in all): the suite's.
pytestmark = pytest.mark.slow

ATOL = 1e-4  # f32 logits, ours vs transformers' (measured: 3e-6 to 5e-6)
PROMPT_LEN, DECODE_STEPS, N_TOKENS = 40, 8, 12
CONTEXT = 128  # LongRoPE (phi3) picks its short factors up to its original 128 positions
TWO_WORKERS = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}
MOE = [f for f in FAMILIES if f in ("qwen3_moe", "mixtral")]


@dataclass
class Family:
    name: str
    folder: Path
    config: LlamaConfig
    reference: Any  # transformers' model
    ours: Llama


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    name = request.param
    folder = build_family(tmp_path_factory.mktemp(name), name, shard=name in MOE)
    config = LlamaConfig.from_folder(folder)
    ours = load_llama(folder, range(config.n_layers), True, True, torch.float32, "cpu", CONTEXT)
    return Family(name, folder, config, reference_model(folder), ours)


def prompt(seed: int = 0, length: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(1000, 100000, (1, length), generator=torch.Generator().manual_seed(seed))


def logits(model: Llama, tokens: torch.Tensor, start: int, cache: dict) -> torch.Tensor:
    return model.head(model.run_blocks(model.embed(tokens), start, cache, model.blocks))


def reference_greedy(family: Family, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = family.reference.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def test_the_config_reads_as_the_family(family: Family) -> None:
    """Guard the fixtures: each family's options are on (a Llama reading would also run)."""
    c = family.config
    expected = {
        "mistral": c.is_sliding(0) and c.sliding_window == 24,
        "qwen2": c.attention_bias and not c.is_sliding(3),
        "qwen3": c.qk_norm and c.head_dim == 32,
        "gemma3_text": c.sandwich_norms and c.is_sliding(0) and not c.is_sliding(2)
        and c.local_rope_theta == 10000.0 and c.rope_type == "linear" and c.final_softcap == 30.0,
        "phi3": c.fused_checkpoint and c.rotary_dim == 12 and c.rope_type == "longrope",
        "qwen3_moe": c.is_sparse(0) and not c.is_sparse(1) and c.normalize_expert_weights,
        "mixtral": all(c.is_sparse(i) for i in range(4)) and c.experts_per_token == 2,
    }  # fmt: skip
    assert expected[family.name]


@torch.inference_mode()
def test_prefill_and_decode_logits_match_transformers(family: Family) -> None:
    tokens = prompt()
    out = family.reference(tokens, use_cache=True)
    cache = family.ours.new_cache(CONTEXT)
    torch.testing.assert_close(logits(family.ours, tokens, 0, cache), out.logits, atol=ATOL, rtol=0)
    past = out.past_key_values
    for step in range(DECODE_STEPS):  # past the 24-position windows
        token = torch.tensor([[500 + 37 * step]])
        out = family.reference(token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        ours = logits(family.ours, token, PROMPT_LEN + step, cache)
        torch.testing.assert_close(ours, out.logits, atol=ATOL, rtol=0)


@torch.inference_mode()
def test_longrope_turns_to_its_long_factors_past_the_original_context(family: Family) -> None:
    """Phi-3's LongRoPE: forwards that end past position 128 (its original context here)
    rotate with the long factors, as transformers does; the cached positions keep theirs."""
    if family.name != "phi3":
        pytest.skip("LongRoPE is Phi-3's")
    long_context = 256
    ours = load_llama(family.folder, range(4), True, True, torch.float32, "cpu", long_context)
    tokens = prompt(8, 120)
    out = family.reference(tokens, use_cache=True)
    cache = ours.new_cache(long_context)
    torch.testing.assert_close(logits(ours, tokens, 0, cache), out.logits, atol=ATOL, rtol=0)
    past = out.past_key_values
    for step in range(16):  # positions 120..135: the switch at 128
        token = torch.tensor([[900 + 11 * step]])
        out = family.reference(token, past_key_values=past, use_cache=True)
        past = out.past_key_values
        torch.testing.assert_close(
            logits(ours, token, 120 + step, cache), out.logits, atol=ATOL, rtol=0
        )
    assert ours.rope is not None and ours.rope.long is not None


def test_greedy_tokens_equal_transformers_locally_and_over_two_workers(
    family: Family, tmp_path: Path
) -> None:
    ids = prompt(1).tolist()[0]
    expected = reference_greedy(family, ids, N_TOKENS)
    assert greedy_tokens(family.folder, ids, N_TOKENS, max_seq_len=CONTEXT) == expected

    async def over_workers() -> list[int]:
        async with cluster(family.folder, tmp_path, TWO_WORKERS) as (topology, _):
            master = await Master.open(
                MasterSettings(
                    family.folder, topology, device="cpu", dtype="f32", max_seq_len=CONTEXT
                )
            )
            try:
                return [t async for t in master.generate(ids, GREEDY, N_TOKENS, True)]
            finally:
                await master.close()

    assert asyncio.run(over_workers()) == expected


def test_split_bundles_load_to_the_same_parts(family: Family, tmp_path: Path) -> None:
    topology = tmp_path / "topology.yml"
    spec = {
        n: {"host": f"127.0.0.1:{10200 + i}", "layers": b}
        for i, (n, b) in enumerate(TWO_WORKERS.items())
    }
    topology.write_text(yaml.safe_dump(spec))
    bundles = split_model(family.folder, topology, tmp_path / "out")
    for name in TWO_WORKERS:
        blocks = load_topology(bundles[name] / "topology.yml").node(name).blocks
        part = load_llama(bundles[name], blocks).state_dict()
        whole = load_llama(family.folder, blocks).state_dict()
        assert part.keys() == whole.keys() and part
        assert all(torch.equal(part[k], whole[k]) for k in part), name
    master = load_llama(bundles["master"], [], True, True, max_seq_len=CONTEXT)
    with torch.inference_mode():
        hidden = family.ours.embed(prompt(2, 5))
        torch.testing.assert_close(master.embed(prompt(2, 5)), hidden, atol=0, rtol=0)
        torch.testing.assert_close(master.head(hidden), family.ours.head(hidden), atol=0, rtol=0)


def fake_quantized(folder: Path, scheme: str, target: Path) -> Path:
    """The checkpoint with every weight cake quantizes replaced by its dequantized quantized
    form, in f32: what transformers-parity (above) then vouches for, exactly. Linear weights
    `scheme`, the head (a tied embedding with it) int8, as cake's loader does."""
    from safetensors.torch import load_file, save_file

    from cake.model.layout import EMBEDDING, HEAD, is_linear_weight
    from cake.model.quant import quantize

    config = LlamaConfig.from_folder(folder)
    tensors: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        tensors.update(load_file(file))
    for name, tensor in tensors.items():
        if is_linear_weight(name):
            tensors[name] = quantize(tensor, scheme).dequantize(torch.float32)
        elif name == HEAD or (name == EMBEDDING and config.tie_word_embeddings):
            tensors[name] = quantize(tensor, "int8").dequantize(torch.float32)
    target.mkdir()
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    for path in folder.iterdir():
        if path.suffix != ".safetensors" and path.name != "model.safetensors.index.json":
            shutil.copy(path, target / path.name)
    return target


# Relative L2 error of the logits, quantized weights vs f32 on their dequantized values, with the
# kernel that computes the exact f32 product (dequant-gemm; measured ~1e-6): every weight the
# family has is quantized as the loader says, and only those. (Kernel accuracy is
# tests/test_kernels.py's; here any kernel noise could flip an expert choice in an MoE block.)
QUANTIZED_BOUND = 1e-4


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@torch.inference_mode()
def test_quantized_weights_run_as_their_dequantized_values(
    family: Family, scheme: str, tmp_path: Path
) -> None:
    if native.library() is None:
        pytest.skip(f"no native kernels: {native.unavailable_reason()}")
    probe.use("dequant-gemm")
    n = family.config.n_layers
    quantized = load_llama(
        family.folder, range(n), True, True, torch.float32, "cpu", CONTEXT,
        quantization=Quantization(scheme),
    )  # fmt: skip
    reference_folder = fake_quantized(family.folder, scheme, tmp_path / "dequantized")
    reference = load_llama(reference_folder, range(n), True, True, torch.float32, "cpu", CONTEXT)
    tokens = prompt(3)
    exact = logits(reference, tokens, 0, reference.new_cache(CONTEXT))
    approx = logits(quantized, tokens, 0, quantized.new_cache(CONTEXT))
    probe.use(probe.AUTO)
    error = float((approx - exact).norm() / exact.norm())
    assert error < QUANTIZED_BOUND, (scheme, error)
    unquantized = logits(family.ours, tokens, 0, family.ours.new_cache(CONTEXT))
    assert float((unquantized - exact).norm() / exact.norm()) > 100 * error  # it was quantized


# --- mixture of experts ------------------------------------------------------------------------


def moe(family: Family) -> None:
    if family.name not in MOE:
        pytest.skip("not a mixture-of-experts family")


@torch.inference_mode()
def test_a_decode_step_runs_only_the_routed_experts(family: Family) -> None:
    moe(family)
    model = family.ours
    cache = model.new_cache(CONTEXT)
    logits(model, prompt(4), 0, cache)
    ran: dict[int, list[int]] = {}
    routed: dict[int, list[int]] = {}
    hooks = []
    for index in model.blocks:
        mlp = model.model.layers[str(index)].mlp
        if not isinstance(mlp, SparseMoE):
            continue
        route = mlp.route

        def recorded(x: torch.Tensor, index: int = index, route: Any = route) -> Any:
            weights, chosen = route(x)
            routed[index] = sorted(chosen.flatten().tolist())
            return weights, chosen

        mlp.route = recorded  # type: ignore[method-assign]
        for e, expert in enumerate(mlp.experts):
            hooks.append(expert.register_forward_hook(
                lambda *_, index=index, e=e: ran.setdefault(index, []).append(e)
            ))  # fmt: skip
    try:
        logits(model, torch.tensor([[777]]), PROMPT_LEN, cache)
    finally:
        for hook in hooks:
            hook.remove()
        for index in model.blocks:
            vars(model.model.layers[str(index)].mlp).pop("route", None)
    assert routed and ran.keys() == routed.keys()
    for index, experts in routed.items():
        assert len(experts) == family.config.experts_per_token
        assert sorted(ran[index]) == experts, index  # each routed expert once, no other


@torch.inference_mode()
def test_batched_rows_equal_each_session_alone(family: Family) -> None:
    """The scheduler's path: two sessions' rows in one pass (experts grouped over both)."""
    moe(family)
    model = family.ours
    first, second = prompt(5, 9), prompt(6, 7)
    alone = [logits(model, p, 0, model.new_cache(CONTEXT)) for p in (first, second)]
    caches = [model.new_cache(CONTEXT), model.new_cache(CONTEXT)]
    segments = [Segment(caches[0], 0, 0, 9), Segment(caches[1], 0, 9, 7)]
    hidden = model.embed(torch.cat([first, second], dim=1))
    together = model.head(model.run_segments(hidden, segments, model.blocks))
    torch.testing.assert_close(together[:, :9], alone[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(together[:, 9:], alone[1], atol=ATOL, rtol=0)


def test_speculative_verification_equals_plain_decoding(family: Family) -> None:
    """The model as its own draft: every step verifies several rows through the experts."""
    moe(family)
    ids = prompt(7).tolist()[0]
    plain = greedy_tokens(family.folder, ids, N_TOKENS, max_seq_len=CONTEXT)

    async def drafted() -> tuple[list[int], GenerationStats]:
        master = await Master.open(
            MasterSettings(family.folder, device="cpu", dtype="f32", max_seq_len=CONTEXT)
        )
        try:
            master.generator.draft_model = DraftModel(master.ends, CONTEXT, "the model itself")
            stats = GenerationStats()
            draft = DraftSettings("model", 3)
            tokens = [
                t async for t in master.generate(ids, GREEDY, N_TOKENS, True, stats, draft=draft)
            ]
            return tokens, stats
        finally:
            await master.close()

    tokens, stats = asyncio.run(drafted())
    assert tokens == plain
    assert stats.accepted == stats.drafted > 0 and stats.decode_steps < stats.decode_tokens


def test_expert_load_counts_every_routed_row_on_each_stage(family: Family, tmp_path: Path) -> None:
    """--stats' load balance: each stage's counts, the workers' from their replies, sum to the
    rows it computed times k times its sparse blocks."""
    moe(family)
    ids = prompt(9, 10).tolist()[0]
    config = family.config

    async def run() -> dict[str, list[int]]:
        async with cluster(family.folder, tmp_path, TWO_WORKERS) as (topology, _):
            settings = MasterSettings(
                family.folder, topology, device="cpu", dtype="f32", max_seq_len=CONTEXT
            )
            master = await Master.open(settings)
            try:
                assert len([t async for t in master.generate(ids, GREEDY, 5, True)]) == 5
                return master.expert_load()
            finally:
                await master.close()

    load = asyncio.run(run())
    rows = len(ids) + 5 - 1  # the prompt, then each new token but the last
    assert load.keys() == {"w1", "w2"}
    for label, blocks in (("w1", range(2)), ("w2", range(2, 4))):
        sparse = sum(config.is_sparse(i) for i in blocks)
        assert len(load[label]) == config.n_experts
        assert sum(load[label]) == rows * config.experts_per_token * sparse, label


def test_stats_shows_the_expert_load_balance(family: Family) -> None:
    moe(family)
    result = run_cli(
        "--model", str(family.folder), "--prompt", "Hi", "-n", "3", "--temperature", "0",
        "--stats", "--device", "cpu", "--max-seq-len", str(CONTEXT),
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("experts on master: "))
    assert re.search(rf"\d+ of {family.config.n_experts} experts used; busiest #\d+ with ", line)


# Each family's chat format, as its published tokenizer_config.json spells it (shortened to the
# turns used here), and the end-of-turn token its generation_config.json names.
CHAT_TEMPLATES = {
    "chatml": (  # Qwen2.5, Qwen3, Qwen3-MoE
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == "
        "'assistant' else m['role']) + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
        "<|begin_of_text|><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    ),
    "mistral": (  # Mistral, Mixtral
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}{% endfor %}",
        "<|begin_of_text|>[INST] Hi there [/INST]",
    ),
    "phi": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
        "<|user|>\nHi there<|end|>\n<|assistant|>\n",
    ),
}
TEMPLATE_OF = {
    "mistral": "mistral",
    "mixtral": "mistral",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "qwen3_moe": "chatml",
    "gemma3_text": "gemma",
    "phi3": "phi",
}


def test_chat_template_and_stop_tokens_come_from_the_tokenizer(
    family: Family, tmp_path: Path
) -> None:
    from cake.model.tokenizer import encode_prompt, load_tokenizer, stop_token_ids

    folder = tmp_path / "model"
    shutil.copytree(family.folder, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    template, expected = CHAT_TEMPLATES[TEMPLATE_OF[family.name]]
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**settings, "chat_template": template})
    )
    generation = json.loads((folder / "generation_config.json").read_text())
    end_of_turn = 128042  # a reserved special token of the Llama 3 vocabulary
    (folder / "generation_config.json").write_text(
        json.dumps({**generation, "eos_token_id": [end_of_turn]})
    )
    tokenizer = load_tokenizer(folder)
    ids = encode_prompt(tokenizer, "Hi there")
    assert tokenizer.decode(ids) == expected
    assert end_of_turn in stop_token_ids(folder, family.config, tokenizer)


def test_placement_counts_a_sparse_block_with_all_its_experts(family: Family) -> None:
    """Every expert must be in memory, routed to or not: a block's bytes for placement and the
    budget are its weights with all experts (and the largest block's, where some are dense)."""
    from cake.cluster.measure import block_bytes

    moe(family)
    c = family.config
    attention = c.hidden_size * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    experts = c.n_experts * 3 * c.hidden_size * c.expert_intermediate_size
    norms = 2 * c.hidden_size + c.n_experts * c.hidden_size  # norms and the router: float
    norms += 2 * c.head_dim if c.qk_norm else 0
    cache = 2 * c.n_kv_heads * c.head_dim * CONTEXT
    f32 = torch.float32.itemsize
    assert block_bytes(c, torch.float32, CONTEXT) == (attention + experts + norms + cache) * f32
    int8 = block_bytes(c, torch.float32, CONTEXT, "int8")
    assert int8 == attention + experts + (norms + cache) * f32
