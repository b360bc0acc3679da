"""Speculative decoding: greedy text identical to plain decoding (lookup and draft model, local,
over workers, across a worker restart), the rejection rule keeps the sampling distribution,
rollback never lets a rejected position be attended, the draft-size controller, the proxy."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
import yaml
from api_server import api_in_thread  # the API server in a thread
from cluster import GREEDY, ProcessCluster, cluster
from helpers import greedy_tokens, run_cli

from cake.decoding.draft import Draft, DraftModel, LookupDrafter
from cake.decoding.sampling import Sampler, SamplingParams
from cake.decoding.speculative import DraftController, DraftSettings, accept_draft, request_draft
from cake.decoding.stats import GenerationStats
from cake.engine.remote_stage import SessionInputs
from cake.errors import ModelFolderError
from cake.master import Master, MasterSettings
from cake.model.loader import load_llama
from cake.wire.delay_proxy import ThreadedDelayProxy

# A prompt whose text repeats, so lookup finds something; the random models' continuations
# are random, so rejections (and rollbacks) happen all the time as well.
PROMPT = "one two three four five six one two three four five six one two three"
N = 16
LOOKUP = DraftSettings("lookup")
LOOKUP_4 = DraftSettings("lookup", 4)
MODEL = DraftSettings("model")
MODEL_3 = DraftSettings("model", 3)
TWO_WORKERS = {"w1": ["model.layers.0-1"], "w2": ["model.layers.2-3"]}


async def tokens_of(
    master: Master, draft: DraftSettings | None, n: int = N, prompt: str = PROMPT
) -> tuple[list[int], GenerationStats]:
    stats = GenerationStats()
    ids = master.encode(prompt)
    out = [t async for t in master.generate(ids, GREEDY, n, True, stats, draft=draft)]
    return out, stats


def _itself(master: Master) -> DraftModel:
    """A local master's own model as its draft (all blocks are on the master): the ceiling."""
    return DraftModel(master.ends, master.max_seq_len, "the model itself")


async def open_master(folder: Path, topology: Path | None = None, **kw: object) -> Master:
    return await Master.open(
        MasterSettings(folder, topology, device="cpu", dtype="f32", max_seq_len=256, **kw)
    )


# ---------------------------------------------------------------- greedy: identical text


def test_greedy_with_drafting_equals_plain_locally(tiny_llama: Path, tiny_llama_tied: Path) -> None:
    """Lookup (auto and 4 tokens) and draft models (another model with the same tokenizer: many
    rejections; the model itself: everything accepted) give plain decoding's tokens."""

    async def run() -> None:
        master = await open_master(tiny_llama, draft=str(tiny_llama_tied))
        try:
            plain = greedy_tokens(tiny_llama, PROMPT, N, max_seq_len=256)
            for draft in (LOOKUP, MODEL_3):
                tokens, stats = await tokens_of(master, draft)
                assert tokens == plain, draft
                assert stats.decode_tokens + 1 == len(tokens)
            assert 0 <= stats.accepted < stats.drafted  # another model: rejections, rollbacks
            master.generator.draft_model = _itself(master)
            tokens, stats = await tokens_of(master, MODEL)
            assert tokens == plain
            # The same model as its own draft: every drafted token is accepted.
            assert stats.accepted == stats.drafted > 0
            assert stats.decode_steps < stats.decode_tokens
        finally:
            await master.close()

    asyncio.run(run())


def test_greedy_with_drafting_equals_plain_over_workers(tiny_llama: Path, tmp_path: Path) -> None:
    """Over two in-process workers, behind delaying proxies too; fewer round trips per token."""

    async def run() -> None:
        local = await open_master(tiny_llama)
        plain = greedy_tokens(tiny_llama, PROMPT, N, max_seq_len=256)
        itself = _itself(local)
        async with cluster(tiny_llama, tmp_path, TWO_WORKERS) as (topology, _):
            proxied = tmp_path / "proxied.yml"
            spec = yaml.safe_load(topology.read_text())
            proxies = []
            for entry in spec.values():
                host, port = entry["host"].rsplit(":", 1)
                proxy = ThreadedDelayProxy(host, int(port), 0.002)
                proxies.append(proxy)
                entry["host"] = f"127.0.0.1:{proxy.port}"
            proxied.write_text(yaml.safe_dump(spec))
            try:
                for where in (topology, proxied):
                    master = await open_master(tiny_llama, where)
                    master.generator.draft_model = itself
                    try:
                        for draft in (LOOKUP_4, MODEL_3):
                            tokens, stats = await tokens_of(master, draft)
                            assert tokens == plain, (where.name, draft)
                            # One round trip per worker per round, fewer rounds than tokens.
                            assert stats.round_trips == 2 * (stats.decode_steps + 1)
                            if draft is MODEL_3:
                                assert stats.decode_steps < stats.decode_tokens
                                # Drafted during the previous round's trips (all accepted).
                                assert stats.drafted_ahead > 0
                    finally:
                        await master.close()
            finally:
                for proxy in proxies:
                    proxy.close()
                await local.close()

    asyncio.run(run())


@pytest.fixture
def worker_processes(tiny_llama: Path, tmp_path: Path) -> Iterator[ProcessCluster]:
    processes = ProcessCluster(tiny_llama, tmp_path / "topology.yml", TWO_WORKERS)
    try:
        yield processes
    finally:
        processes.stop()


@pytest.mark.slow  # worker processes, one killed and restarted
def test_greedy_drafting_survives_a_worker_kill_and_restart(
    worker_processes: ProcessCluster, tiny_llama_tied: Path
) -> None:
    """The replay after a restart rebuilds only accepted positions (the other model's drafts are
    mostly rejected and rolled back); the text is plain decoding's, with no token twice."""
    restarted = threading.Thread()
    steps_before_kill = -1

    async def run() -> tuple[list[int], list[int], GenerationStats]:
        nonlocal restarted, steps_before_kill
        master = await open_master(
            worker_processes.model, worker_processes.topology, draft=str(tiny_llama_tied)
        )
        try:
            plain = greedy_tokens(worker_processes.model, PROMPT, N, max_seq_len=256)
            stats = GenerationStats()
            tokens: list[int] = []
            ids = master.encode(PROMPT)
            async for token in master.generate(ids, GREEDY, N, True, stats, draft=MODEL_3):
                tokens.append(token)
                if len(tokens) == 9:
                    steps_before_kill = stats.decode_steps
                    worker_processes.workers["w2"].kill()
                    restarted = threading.Thread(target=worker_processes.restart, args=("w2",))
                    restarted.start()
        finally:
            await master.close()
        return plain, tokens, stats

    plain, tokens, stats = asyncio.run(run())
    restarted.join()
    assert tokens == plain
    assert stats.drafted > 0
    # w2's stage replayed the forwards it had received, one round trip each (the prompt and
    # each round before the kill, trimmed to what was accepted), on top of one per worker per
    # round.
    assert stats.round_trips == 2 * (stats.decode_steps + 1) + 1 + steps_before_kill


# ---------------------------------------------------------------- sampling: the rejection rule


def _probs(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.slow  # 20,000 draws, so that the frequencies are tight
@pytest.mark.parametrize("draft_q", [None, [0.1, 0.6, 0.2, 0.1]])
def test_rejection_rule_keeps_the_model_distribution(draft_q: list[float] | None) -> None:
    """On a 4-token vocabulary: whatever the draft proposes (a fixed guess, or a draw from its
    own q), the first token's frequencies are the model's p, and the second token's (after an
    accepted first) are p2; a drafted token p gives no mass is never accepted."""
    p = _probs([0.5, 0.2, 0.3, 0.0])
    p2 = _probs([0.1, 0.1, 0.1, 0.7])
    logits = torch.log(torch.stack([p, p2, p2]).clamp_min(1e-30))  # temperature 1: softmax = p
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1234))
    rng = torch.Generator().manual_seed(99)
    n = 20000
    first = torch.zeros(4)
    second = torch.zeros(4)
    accepted_first = 0
    for _ in range(n):
        if draft_q is None:
            draft = Draft([1, 3])  # fixed guesses, point masses
        else:
            q = _probs(draft_q)
            d1, d2 = (int(torch.multinomial(q, 1, generator=rng)) for _ in range(2))
            draft = Draft([d1, d2], [q, q])
        out = accept_draft(draft, logits, [0], sampler)
        first[out[0]] += 1
        if len(out) > 1:
            accepted_first += 1
            second[out[1]] += 1
    assert first[3] == 0  # p(3) = 0: never produced, though drafted
    torch.testing.assert_close(first / n, p, atol=0.012, rtol=0)
    assert accepted_first > 1000
    torch.testing.assert_close(second / accepted_first, p2, atol=0.03, rtol=0)


def test_sampling_with_the_model_as_its_own_draft(tiny_llama: Path) -> None:
    """Seeded sampling with drafting is reproducible; a draft that samples from the model's own
    distribution (q = p) has nearly every token accepted."""

    async def run() -> list[tuple[list[int], GenerationStats]]:
        master = await open_master(tiny_llama)
        master.generator.draft_model = _itself(master)
        params = SamplingParams(temperature=0.8, top_k=50, seed=7)
        try:
            ids = master.encode(PROMPT)
            runs = []
            for _ in range(2):
                stats = GenerationStats()
                tokens = [t async for t in master.generate(ids, params, 12, True, stats, MODEL_3)]
                runs.append((tokens, stats))
            return runs
        finally:
            await master.close()

    (a, stats), (b, _) = asyncio.run(run())
    assert a == b and len(a) == 12
    assert stats.accepted >= 0.8 * stats.drafted > 0


# ---------------------------------------------------------------- rollback


def test_rejected_positions_are_never_attended(tiny_llama: Path) -> None:
    """Write rejected drafts at positions 5..9, then go on from 5 with other tokens: the hidden
    states equal those of a cache that never saw the rejected drafts."""
    model = load_llama(tiny_llama, range(4), with_embedding=True, with_head=True, max_seq_len=64)
    tokens = torch.tensor([[10, 20, 30, 40, 50]])
    rejected = torch.tensor([[99, 98, 97, 96, 95]])
    going_on = torch.tensor([[60, 70]])
    with torch.inference_mode():
        dirty = model.new_cache(64)
        model.run_blocks(model.embed(tokens), 0, dirty, model.blocks)
        model.run_blocks(model.embed(rejected), 5, dirty, model.blocks)
        after_rollback = model.run_blocks(model.embed(going_on), 5, dirty, model.blocks)
        clean = model.new_cache(64)
        model.run_blocks(model.embed(tokens), 0, clean, model.blocks)
        expected = model.run_blocks(model.embed(going_on), 5, clean, model.blocks)
    torch.testing.assert_close(after_rollback, expected, atol=0, rtol=0)


def test_remote_stage_forgets_rolled_back_inputs() -> None:
    """What a replay after worker loss would send: only the positions kept."""
    inputs = SessionInputs()
    inputs.add(0, torch.ones(1, 5, 2))
    inputs.add(5, torch.full((1, 4, 2), 2.0))  # a verification of 3 drafts
    inputs.truncate(6)  # one accepted
    assert inputs.length == 6
    inputs.add(6, torch.full((1, 1, 2), 3.0))
    seen = torch.cat(inputs.chunks, dim=1)
    assert seen.shape == (1, 7, 2)
    assert seen[0, :, 0].tolist() == [1, 1, 1, 1, 1, 2, 3]


def test_worker_rolls_a_session_back_on_an_earlier_forward(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """A forward from an earlier position drops what lay beyond (the worker's bookkeeping)."""

    async def run() -> None:
        async with cluster(tiny_llama, tmp_path, {"w1": ["model.layers.0-3"]}) as (topology, ws):
            master = await open_master(tiny_llama, topology)
            try:
                session = master.scheduler.open_session()
                await session.forward([1, 2, 3, 4, 5, 6], 0)
                (key,) = ws["w1"].store.keys()
                worker_session = ws["w1"].store.get(key)
                assert worker_session is not None
                assert worker_session.length == 6
                await session.forward([7], 3)
                assert worker_session.length == 4
                await session.close()
            finally:
                await master.close()

    asyncio.run(run())


# ---------------------------------------------------------------- drafting and its control


def test_lookup_proposes_what_followed_the_latest_match() -> None:
    drafter = LookupDrafter()
    sampler = Sampler(SamplingParams(temperature=0))
    history = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2]
    assert drafter.propose(history, 3, sampler).tokens == [3, 7, 8]  # latest "1 2" -> "3 7 8"
    assert drafter.propose([*history, 3], 2, sampler).tokens == [7, 8]  # "1 2 3" (3-gram)
    assert drafter.propose([*history, 3, 4], 2, sampler).tokens == []  # "3 4" never seen
    assert drafter.propose([5, 6, 5], 2, sampler).tokens == []  # a shorter history: reindexed


def test_controller_drafts_when_round_trips_dominate_and_stops_when_it_does_not_pay() -> None:
    rtt_bound = DraftController()
    compute_bound = DraftController()
    for _ in range(30):
        for k in (1, 4):
            # 20 ms per round whatever its size, drafts accepted: draft as much as allowed.
            rtt_bound.record(k, k, 1 + k, 0.020, 0.0)
            # 10 ms per position, drafts rejected: drafting costs, so plain decoding.
            compute_bound.record(k, 0, 1 + k, 0.010 * (1 + k), 0.0)
    assert rtt_bound.choose() == rtt_bound.max_tokens
    choices = [compute_bound.choose() for _ in range(16)]
    assert choices.count(0) >= 14  # and a probe of one token now and then
    assert DraftController(fixed=5).choose() == 5
    # Two drafts per round, all accepted, round trips dominating: the positions never tried yet
    # are expected to go on like the tried ones, so the next round drafts much further.
    grows = DraftController()
    grows.observe_prefill(100, 0.1)  # 1 ms per position
    for _ in range(3):
        grows.record(2, 2, 3, 0.020, 0.0)
    assert grows.choose() > 6


def test_draft_settings_and_request_overrides() -> None:
    server = DraftSettings("lookup", None)
    assert request_draft(server, None, None, False) == server
    assert request_draft(server, "none", None, False) == DraftSettings("none")
    assert request_draft(server, None, "6", False) == DraftSettings("lookup", 6)
    with pytest.raises(ValueError, match="--draft PATH"):
        request_draft(server, "model", None, False)
    with pytest.raises(ValueError, match="draft tokens"):
        request_draft(server, None, 0, False)
    with pytest.raises(ValueError, match="draft mode"):
        DraftSettings("sometimes")


def test_a_draft_model_with_another_vocabulary_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_llama, other)
    config = (
        (other / "config.json").read_text().replace('"vocab_size": 128256', '"vocab_size": 4096')
    )
    (other / "config.json").write_text(config)
    with pytest.raises(ModelFolderError, match="vocabulary has 4096 tokens, the model's 128256"):
        asyncio.run(open_master(tiny_llama, draft=str(other)))


# ---------------------------------------------------------------- the delaying proxy


def test_delay_proxy_keeps_order_and_delays_each_direction() -> None:
    """Bytes arrive intact and in order; a round trip takes at least twice the delay."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=echo, daemon=True)
    thread.start()
    proxy = ThreadedDelayProxy("127.0.0.1", port, 0.01)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            payload = os.urandom(300_000)
            started = time.monotonic()
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            assert time.monotonic() - started >= 0.02
            for i in range(0, len(payload), 7000):  # many chunks, back to back
                client.sendall(payload[i : i + 7000])
            received = b""
            while len(received) < len(payload):
                received += client.recv(65536)
            assert received == payload
    finally:
        proxy.close()
        server.close()
        thread.join(5)


# ---------------------------------------------------------------- CLI and HTTP API


def test_cli_draft_lookup_prints_the_plain_text_and_drafting_stats(tiny_llama: Path) -> None:
    """cake-cli (in this process): --draft lookup prints the plain text, and its stats."""
    base = ["--model", str(tiny_llama), "--device", "cpu"]
    base += ["--prompt", PROMPT, "--temperature", "0", "-n", "12", "--ignore-eos"]
    plain = run_cli(*base)
    drafted = run_cli(*base, "--draft", "lookup", "--draft-tokens", "3", "--stats")
    assert (plain.exit_code, drafted.exit_code) == (0, 0), drafted.stderr
    assert drafted.stdout == plain.stdout and plain.stdout.strip()
    log = drafted.stderr
    assert re.search(r"drafted: [1-9]\d*, accepted: \d+ \(\d+%\), tokens/round trip", log), log


def test_cli_refuses_bad_draft_tokens(tiny_llama: Path) -> None:
    result = run_cli("--model", str(tiny_llama), "--draft", "lookup", "--draft-tokens", "lots")
    assert result.exit_code == 1
    assert "error: draft tokens must be a whole number or 'auto', not 'lots'" in result.stderr


def test_api_cake_draft_field(tiny_llama: Path) -> None:
    """Per request: lookup gives the plain text; 'model' without --draft PATH is a clear 400."""
    with api_in_thread(tiny_llama, api_key=None) as server:
        client = server.client()

        def complete(**extra: object) -> str:
            reply = client.completions.create(
                model=server.model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extra
            )
            return reply.choices[0].text

        plain = complete()
        assert complete(cake_draft="lookup", cake_draft_tokens=4) == plain
        assert complete(cake_draft="none") == plain
        with pytest.raises(openai.BadRequestError, match="needs a draft model"):
            complete(cake_draft="model")
        with pytest.raises(openai.BadRequestError, match="draft tokens"):
            complete(cake_draft="lookup", cake_draft_tokens=0)
