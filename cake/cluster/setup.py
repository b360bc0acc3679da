"""From worker addresses to a running topology: measure, plan, push, assign.

    cake-cli --model M --workers HOST:PORT[,HOST:PORT...] --cluster-key K ...
    cake-cli --model M --discover [--min-workers N] --cluster-key K ...

For each worker, over one authenticated control connection: ``describe`` (device, memory it
offers), a few pings (round trip), ``measure`` (one block of this model at this dtype, timed
there, with its linear weights quantized as they will be pushed). The master times a block
itself too. `placement.place` picks contiguous ranges; the plan is logged with its predicted
speed (``--plan`` prints it as topology.yml and stops). Then each worker gets exactly its
blocks' tensors in the form it will run (`payload.Payload`), resumed after a broken connection,
and an ``assign``; the result is an ordinary `Topology` the master runs as if it had been
written by hand.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cake.cluster.measure import MEMORY_HEADROOM, time_block
from cake.cluster.payload import ModelManifest, Payload, PushItem
from cake.cluster.placement import KEEP_TOLERANCE, MASTER, StageCost, keep_or_replace, place
from cake.cluster.push import PushRefused, PushStats, push
from cake.engine.pipeline import Replanning
from cake.errors import CakeError, Code, WorkerError
from cake.host.devices import compute_dtype, resolve_device
from cake.host.memory import device_memory, release_free_memory
from cake.host.progress import progress_bar
from cake.host.sizes import format_size
from cake.model.config import LlamaConfig
from cake.model.kernels.probe import activations_dtype
from cake.model.opener import open_model
from cake.model.quant import Quantization
from cake.topology import Node, Topology, format_blocks, parse_address
from cake.wire.handshake import prove_key
from cake.wire.protocol import (
    Assign,
    Assigned,
    Describe,
    Description,
    ErrorMessage,
    Measure,
    Measured,
    Message,
    Ping,
    Pong,
    ProtocolError,
)
from cake.wire.retry import retry
from cake.wire.transport import Link, LinkError, open_link

log = logging.getLogger(__name__)

RTT_PINGS = 5
MEASURE_TIMEOUT_S = 120.0  # a block of a large model on a slow device takes a while to build
# A broken push reconnects after these pauses (doubling); a busy worker is asked again after
# ASSIGN_RETRY_DELAY_S each time.
PUSH_FIRST_DELAY_S, PUSH_MAX_DELAY_S = 0.2, 2.0
ASSIGN_RETRY_DELAY_S = 0.1


@dataclass
class ClusterOptions:
    """What the master command line says about the cluster (typed, not the CLI's dict)."""

    workers: list[str]  # HOST:PORT
    cluster_key: bytes
    tls: ssl.SSLContext | None = None
    device: str = "auto"  # the master's own device
    dtype: str = "auto"  # every stage's; "auto" is resolved per device
    quantize: str | None = None  # --quantize: what float linear weights become, pushed so
    max_seq_len: int | None = None  # None: the model's, at most opener.DEFAULT_MAX_SEQ_LEN
    master_blocks: int | None = None  # most blocks the master may run itself
    connect_timeout: float = 10.0
    retry_timeout: float = 60.0
    on_sent: Callable[[str, int], object] = lambda worker, count: None  # progress, tests


@dataclass
class WorkerProbe:
    """One worker as measured: its control link stays open for the push and the assignment."""

    host: str
    port: int
    link: Link
    description: Description
    rtt_ms: float
    measured: Measured

    @property
    def name(self) -> str:
        return self.description.worker

    @property
    def label(self) -> str:
        address = Node(self.name, self.host, self.port, "", ()).address
        return f"worker {self.name}" + (f" at {address}" if address != self.name else "")


@dataclass
class ClusterPlan:
    topology: Topology
    summary: str  # the plan and its prediction, for people
    probes: list[WorkerProbe]
    pushed: dict[str, PushStats] = field(default_factory=dict)  # worker name -> what went


async def connect_control(
    host: str, port: int, label: str, key: bytes, tls: ssl.SSLContext | None, timeout: float
) -> Link:
    """Open a control connection and prove the cluster key (the master's half of cake/auth)."""
    link = await open_link(host, port, label, timeout, ssl=tls)
    try:
        await prove_key(link, label, key, timeout)
    except BaseException:
        await link.wait_closed()
        raise
    return link


async def _ask(link: Link, request: Message, kind: type, label: str, timeout: float) -> Message:
    try:
        await link.send(request)
        reply = await link.recv(timeout=timeout)
    except TimeoutError:
        raise WorkerError(f"{label}: no answer to {request.TYPE!r} within {timeout:g}s") from None
    except (LinkError, ProtocolError) as exc:
        raise WorkerError(f"{label}: {exc}") from None
    if isinstance(reply, ErrorMessage):
        raise WorkerError(f"{label} refused {request.TYPE!r}: {reply.message}")
    if not isinstance(reply, kind):
        raise WorkerError(f"{label}: expected {kind.TYPE!r}, got {type(reply).__name__}")
    return reply


async def probe_worker(
    address: str,
    config_text: str,
    options: ClusterOptions,
    one_at_a_time: asyncio.Lock,
    scheme: str = "",
) -> WorkerProbe:
    """Describe, round trip and block timing of one worker. The timings take turns
    (`one_at_a_time`): workers that share a host (several GPUs, or tests) must not slow each
    other's measurement down. `scheme`: the quantization the block's weights will arrive in."""
    host, port = parse_address(address, "--workers")
    label = f"worker at {address}"
    try:
        link = await connect_control(
            host, port, label, options.cluster_key, options.tls, options.connect_timeout
        )
    except LinkError as exc:
        raise WorkerError(f"{exc}; is an empty worker running there?") from None
    try:
        timeout = options.connect_timeout
        try:
            described = await _ask(link, Describe(id=1), Description, label, timeout)
        except WorkerError as exc:
            raise WorkerError(
                f"{exc} (--workers needs empty workers: start them with --mode worker, "
                "--cluster-key and --address, without --model and --topology)"
            ) from None
        assert isinstance(described, Description)
        trips = []
        for i in range(RTT_PINGS):
            started = time.perf_counter()
            await _ask(link, Ping(id=10 + i), Pong, label, timeout)
            trips.append((time.perf_counter() - started) * 1e3)
        measure = Measure(
            id=2,
            config=config_text,
            dtype=options.dtype,
            positions=options.max_seq_len,
            quantize=scheme,
        )
        async with one_at_a_time:
            measured = await _ask(link, measure, Measured, label, MEASURE_TIMEOUT_S)
        assert isinstance(measured, Measured)
    except BaseException:
        await link.wait_closed()
        raise
    probe = WorkerProbe(host, port, link, described, statistics.median(trips), measured)
    log.info(
        "%s: %s, %.2f ms per block (%s), round trip %.2f ms, offers %s (%d blocks)",
        probe.label,
        described.device,
        measured.block_us / 1e3,
        measured.dtype,
        probe.rtt_ms,
        format_size(measured.free_memory),
        measured.free_memory // max(measured.block_bytes, 1),
    )
    return probe


def master_stage(config: LlamaConfig, options: ClusterOptions, scheme: str = "") -> StageCost:
    """The master as a stage: its block time (linear weights `scheme`-quantized, if given), and
    the blocks its memory holds beside the embedding and the head."""
    device = resolve_device(options.device)
    dtype = compute_dtype(options.dtype, device, activations_dtype(device) if scheme else None)
    assert options.max_seq_len is not None
    timing = time_block(config, dtype, device, options.max_seq_len, scheme)
    tables = 1 if config.tie_word_embeddings else 2
    own = tables * config.vocab_size * config.hidden_size * dtype.itemsize
    budget = int(device_memory(device).free * MEMORY_HEADROOM) - own
    capacity = max(budget // timing.block_bytes, 0)
    if options.master_blocks is not None:
        capacity = min(capacity, options.master_blocks)
    log.info(
        "master: %.2f ms per block, room for %d blocks beside the embedding and head",
        timing.block_ms,
        capacity,
    )
    return StageCost(MASTER, timing.block_ms, 0.0, int(capacity))


async def plan_cluster(
    folder_config: LlamaConfig,
    config_text: str,
    options: ClusterOptions,
    model: str | None = None,
    scheme: str = "",
    skip_unreachable: bool = False,
) -> ClusterPlan:
    """Measure every worker and the master, and place the blocks. `model`: the payload's
    cache key; a plan the workers already hold for it is kept unless the new one is clearly
    better (KEEP_TOLERANCE), since timings wobble and every change means a push. `scheme`:
    the quantization the blocks' weights run in ("" for float). `skip_unreachable`: plan
    without workers that do not answer (a re-plan after a loss) instead of failing."""
    if not options.workers:
        raise ValueError("no workers to plan for: give --workers HOST:PORT,... or --discover")
    turns = asyncio.Lock()
    outcomes = await asyncio.gather(
        *(
            probe_worker(address, config_text, options, turns, scheme)
            for address in options.workers
        ),
        return_exceptions=True,
    )
    probes = [o for o in outcomes if isinstance(o, WorkerProbe)]
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if skip_unreachable:
        for failure in [f for f in failures if isinstance(f, WorkerError)]:
            log.warning("leaving a worker out of the plan: %s", failure)
            failures.remove(failure)
    if failures:
        await close_probes(probes)
        raise failures[0]
    names = [probe.name for probe in probes]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        await close_probes(probes)
        raise WorkerError(f"two workers are named {duplicate!r}; give them distinct --name")
    stages = [master_stage(folder_config, options, scheme)] + [
        StageCost(
            probe.name,
            probe.measured.block_us / 1e3,
            max(probe.rtt_ms, 1e-3),
            probe.measured.free_memory // max(probe.measured.block_bytes, 1),
        )
        for probe in probes
    ]
    try:
        placement = place(stages, folder_config.n_layers)
    except ValueError:
        await close_probes(probes)
        raise
    summary = placement.describe()
    log.info("plan: %s", summary)
    held = _held_ranges(probes, model)
    ranges, kept = keep_or_replace(stages, folder_config.n_layers, placement, held)
    if kept is not None:
        log.info(
            "keeping the blocks the workers already hold: %.2f ms against %.2f ms for the "
            "new plan, within %d%% (nothing to push)",
            kept,
            placement.cost_ms,
            KEEP_TOLERANCE * 100,
        )
        summary = f"kept {_describe_ranges(held)}: slowest stage + round trips {kept:.2f} ms"
    by_name = {probe.name: probe for probe in probes}
    stage_of = {stage.name: stage for stage in stages}
    nodes = []
    for name, blocks in sorted(ranges.items(), key=lambda item: item[1].start):
        stage, probe = stage_of[name], by_name[name]
        description = (
            f"{probe.description.device}, {probe.measured.dtype}, {stage.block_ms:.2f} ms/block, "
            f"round trip {probe.rtt_ms:.2f} ms (measured)"
        )
        nodes.append(Node(probe.name, probe.host, probe.port, description, tuple(blocks)))
    topology = Topology(nodes=tuple(nodes), source="<measured plan>")
    return ClusterPlan(topology, summary, probes)


def _held_ranges(probes: list[WorkerProbe], model: str | None) -> dict[str, range]:
    """What the workers serve now of this model, as ranges (a worker's blocks are one run)."""
    held = {}
    for probe in probes:
        blocks = probe.description.blocks
        ours = bool(model) and probe.description.model == model and bool(blocks)
        if ours and list(blocks) == list(range(blocks[0], blocks[-1] + 1)):
            held[probe.name] = range(blocks[0], blocks[-1] + 1)
    return held


def _describe_ranges(ranges: dict[str, range]) -> str:
    return "; ".join(f"{name}: blocks {r.start}-{r.stop - 1}" for name, r in ranges.items())


async def push_and_assign(plan: ClusterPlan, payload: Payload, options: ClusterOptions) -> None:
    """Send each planned worker its blocks' tensors (what it lacks) and assign them."""
    by_name = {probe.name: probe for probe in plan.probes}
    payloads = {
        node.name: await asyncio.to_thread(payload.items, node.blocks)
        for node in plan.topology.nodes
    }
    total = sum(item.nbytes for items in payloads.values() for item in items)
    with progress_bar(total, "pushing to workers", unit="B") as bar:

        def on_progress(worker: str, count: int, sent: bool) -> None:
            bar.update(count)
            if sent:
                options.on_sent(worker, count)

        await asyncio.gather(
            *(
                _push_one(
                    by_name[node.name],
                    node,
                    payloads[node.name],
                    payload.model,
                    plan,
                    options,
                    on_progress,
                )
                for node in plan.topology.nodes
            )
        )


async def _push_one(
    probe: WorkerProbe,
    node: Node,
    items: list[PushItem],
    model: str,
    plan: ClusterPlan,
    options: ClusterOptions,
    on_progress: Callable[[str, int, bool], object],
) -> None:
    """Push one worker its blocks' tensors (resuming after a broken connection), then assign."""
    total = sum(item.nbytes for item in items)
    stats = plan.pushed.setdefault(probe.name, PushStats())
    try:
        await _push_resuming(probe, items, model, stats, options, on_progress)
    except (PushRefused, ProtocolError) as exc:
        raise WorkerError(f"{probe.label}: {exc}") from None
    log.info(
        "%s: pushed %s of %s for blocks %s (%d items sent, %s resumed, %d there already)",
        probe.label,
        format_size(stats.bytes_sent),
        format_size(total),
        format_blocks(node.blocks),
        stats.items_sent,
        format_size(stats.resumed_from),
        stats.items_cached,
    )
    await _assign(probe, node, model, options)


async def _push_resuming(
    probe: WorkerProbe,
    items: list[PushItem],
    model: str,
    stats: PushStats,
    options: ClusterOptions,
    on_progress: Callable[[str, int, bool], object],
) -> None:
    """Push `items`. A connection that breaks mid-push is opened again and every item offered
    again: the worker answers with what it holds, so only the rest travels (--retry-timeout)."""
    broken = False

    async def attempt(_left: float) -> None:
        nonlocal broken
        if broken:
            probe.link = await connect_control(
                probe.host,
                probe.port,
                probe.label,
                options.cluster_key,
                options.tls,
                options.connect_timeout,
            )
            broken = False
        try:
            await push(
                probe.link,
                model,
                items,
                stats,
                on_sent=lambda count: on_progress(probe.name, count, True),
                on_held=lambda count: on_progress(probe.name, count, False),
            )
        except (LinkError, TimeoutError):
            broken = True
            await probe.link.wait_closed()
            raise

    def give_up(failure: Exception) -> WorkerError:
        return WorkerError(
            f"{probe.label}: push did not complete within {options.retry_timeout:g}s "
            f"(--retry-timeout): {failure}"
        )

    await retry(
        attempt,
        retry_on=(LinkError, TimeoutError),
        deadline=time.monotonic() + options.retry_timeout,
        first_delay=PUSH_FIRST_DELAY_S,
        max_delay=PUSH_MAX_DELAY_S,
        on_retry=lambda failure, pause: log.warning(
            "%s: push interrupted (%s); resuming in %.1fs", probe.label, failure, pause
        ),
        give_up=give_up,
    )


async def _assign(probe: WorkerProbe, node: Node, model: str, options: ClusterOptions) -> None:
    """Have the worker load `node`'s blocks from what was pushed, and serve them.

    "busy": a master's forward connections are still open there. Right after a re-plan those
    are our own old ones, which the worker has not seen close yet: ask again shortly, until
    --connect-timeout."""
    assert options.max_seq_len is not None
    assign = Assign(
        id=3, model=model, blocks=node.blocks, dtype=options.dtype, max_seq_len=options.max_seq_len
    )

    async def attempt(_left: float) -> Message:
        try:
            await probe.link.send(assign)
            reply = await probe.link.recv(timeout=MEASURE_TIMEOUT_S)
        except TimeoutError:
            raise WorkerError(f"{probe.label}: no answer to 'assign'") from None
        except (LinkError, ProtocolError) as exc:
            raise WorkerError(f"{probe.label}: {exc}") from None
        if isinstance(reply, ErrorMessage):
            if reply.code == Code.BUSY:
                raise CakeError(Code.BUSY, reply.message)
            raise WorkerError(f"{probe.label} refused 'assign': {reply.message}")
        return reply

    reply = await retry(
        attempt,
        retry_on=CakeError,
        retry_if=lambda refusal: refusal.code is Code.BUSY,
        deadline=time.monotonic() + options.connect_timeout,
        first_delay=ASSIGN_RETRY_DELAY_S,
        max_delay=ASSIGN_RETRY_DELAY_S,
        give_up=lambda busy: WorkerError(f"{probe.label} refused 'assign': {busy}"),
    )
    if not isinstance(reply, Assigned):
        raise WorkerError(f"{probe.label}: expected 'assigned', got {type(reply).__name__}")


async def close_probes(probes: list[WorkerProbe]) -> None:
    await asyncio.gather(*(probe.link.wait_closed() for probe in probes))


async def prepare_cluster(
    model: str, options: ClusterOptions, plan_only: bool = False, skip_unreachable: bool = False
) -> ClusterPlan:
    """Plan (and unless `plan_only`, push and assign); the control connections are closed.
    `skip_unreachable`: plan over the workers that answer (see plan_cluster)."""
    opened = open_model(model)
    opened.fetch(range(opened.config.n_layers), with_ends=True)  # the manifest hashes them all
    folder, config = opened.folder, opened.config
    if options.max_seq_len is None:
        options.max_seq_len = opened.context(None)
    config_text = (folder / "config.json").read_text(encoding="utf-8")
    manifest = await asyncio.to_thread(ModelManifest.for_folder, folder)
    quantization = Quantization(options.quantize) if options.quantize else None
    payload = Payload(manifest, config, quantization)
    plan = await plan_cluster(
        config, config_text, options, payload.model, payload.scheme, skip_unreachable
    )
    try:
        if not plan_only and plan.topology.nodes:
            await push_and_assign(plan, payload, options)
    finally:
        await close_probes(plan.probes)
    # Converting for the push left holes in the C heap that the master's own part would sit
    # on top of: give them back before it loads.
    release_free_memory()
    return plan


def plan_yaml(plan: ClusterPlan) -> str:
    """The plan as a topology.yml a user can edit and pin, with the prediction on top."""
    header = f"# measured plan: {plan.summary}\n# blocks no node lists run on the master\n"
    if not plan.topology.nodes:
        return header + "# every block runs on the master: no worker was worth its round trip\n{}\n"
    return header + plan.topology.to_yaml()


def replanning(
    model: str,
    options: ClusterOptions,
    discover: Callable[[], Awaitable[list[str]]] | None = None,
) -> Replanning:
    """What a master that planned this cluster does when a worker is lost for good: plan
    again over its workers, leaving out those that do not answer (cake/engine/pipeline.py). With
    `discover` (--discover), workers that answer a new discovery join the list first."""

    async def plan_again() -> Topology:
        if discover is not None:
            found = [address for address in await discover() if address not in options.workers]
            if found:
                log.info("discovery found %d more worker(s): %s", len(found), ", ".join(found))
            options.workers += found
        plan = await prepare_cluster(model, options, skip_unreachable=True)
        log.info("new plan: %s", plan.summary)
        return plan.topology

    return Replanning(plan_again)
