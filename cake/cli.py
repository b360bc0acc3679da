"""`cake-cli` and `cake-split-model`: options in, one function per mode. No torch at import time.

Generated text goes to stdout and nothing else does; logs and statistics go to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

import click

from cake.errors import CakeError
from cake.faces.output import READER_GONE_EXIT, ReaderGone, TextOutput, silence_stdout

log = logging.getLogger("cake")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="[%(asctime)s %(levelname)s %(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _setup_threads(opts: dict) -> None:
    """Before torch is imported: how idle OpenMP threads wait, then the thread count.

    spin when this process has its cores to itself, sleep when other stages share them (see
    cake.threads); --thread-wait spin|sleep overrides.
    """
    from cake.host.memory import one_malloc_arena
    from cake.host.threads import (
        apply_wait_policy,
        choose_wait_policy,
        listening_host,
        topology_hosts,
    )

    worker = opts["mode"] == "worker"
    if worker:  # before any thread: a worker loads on a helper thread (see one_malloc_arena)
        one_malloc_arena()
    policy = choose_wait_policy(
        opts["thread_wait"],
        mode=str(opts["mode"]),
        api=bool(opts["api_address"]) and not worker,
        colocated=bool(opts["colocated"]),
        topology_hosts=topology_hosts(opts["topology"]) + _worker_hosts(opts.get("workers")),
        own_host=listening_host(opts["address"], opts["topology"], opts["name"])
        if worker
        else None,
    )
    if apply_wait_policy(policy):
        log.info("idle CPU threads: %s (%s)", policy.wait, policy.reason)
    if opts["threads"] is not None:
        import torch

        torch.set_num_threads(opts["threads"])


def _setup_kernels(opts: dict) -> bool:
    """--kernels: name the kernels to run, or (list) print what this machine has; True when
    there is nothing more to do."""
    from cake.model.kernels import probe

    if opts["kernels"] != "list":
        probe.use(str(opts["kernels"]))
        return False
    from cake.host.devices import resolve_device

    for line in probe.report(resolve_device(str(opts["device"]))):
        click.echo(line)
    return True


def _setup_weight_cache(opts: dict) -> bool:
    """--no-weight-cache, --weight-cache-size; --cache-info and --clear-weight-cache print and
    end the run (True)."""
    from cake.model import weight_cache
    from cake.model.gguf import mapped

    weight_cache.configure(not opts["no_weight_cache"], opts["weight_cache_size"])
    mapped.configure(False if opts["no_mmap"] else None)
    if opts["clear_weight_cache"]:
        click.echo(weight_cache.clear())
    if opts["cache_info"]:
        for line in weight_cache.cache_info():
            click.echo(line)
    return bool(opts["cache_info"] or opts["clear_weight_cache"])


def _worker_hosts(workers: object) -> list[str]:
    """The hosts of --workers HOST:PORT,... (for the thread policy: workers on this host)."""
    if not isinstance(workers, str):
        return []
    return [item.rsplit(":", 1)[0].strip("[]") for item in workers.split(",") if item.strip()]


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--model",
    default=None,
    help="Hugging Face model folder, a .gguf file, or a hub name ORG/NAME[@REVISION] (fetched "
    "into the hub's cache: only the shards this process runs) or ORG/NAME:QUANT (that .gguf "
    "file of the repository). Left out in worker mode: an empty worker that a master "
    "measures, pushes tensors to and assigns blocks.",
)
@click.option(
    "--mode",
    type=click.Choice(["master", "worker"]),
    default="master",
    show_default=True,
    help="master: embed, sample and print text; worker: serve this node's blocks over TCP.",
)
@click.option(
    "--name",
    help="Worker mode: this worker's node name in the topology (empty worker: its --address).",
)
@click.option(
    "--topology", type=click.Path(dir_okay=False), help="topology.yml (blocks per worker)."
)
@click.option(
    "--address",
    help="Worker mode: HOST:PORT to listen on (default: its topology host); port 0 = any free.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Worker mode: once listening, write {name, host, port, pid} as JSON here.",
)
@click.option(
    "--prompt",
    default=None,
    help="The question. Without it: a chat on a terminal, else the prompt is read from stdin.",
)
@click.option("--system-prompt", default=None, help="Adds a system message (none by default).")
@click.option("--raw", is_flag=True, help="No chat template: encode the prompt as it is.")
@click.option(
    "-n",
    "--sample-len",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Most tokens to generate.",
)
@click.option(
    "--temperature",
    default=0.7,
    show_default=True,
    type=click.FloatRange(min=0),
    help="0 = greedy.",
)
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Sample from the k best.")
@click.option(
    "--top-p",
    type=click.FloatRange(0, 1, min_open=True),
    default=None,
    help="Nucleus sampling mass.",
)
@click.option(
    "--repeat-penalty",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="1.0 = off.",
)
@click.option(
    "--repeat-last-n",
    default=64,
    show_default=True,
    type=click.IntRange(min=0),
    help="How many recent tokens the repeat penalty looks at.",
)
@click.option("--seed", type=int, default=None, help="Same seed, same output (default: random).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence tokens.")
@click.option(
    "--dtype",
    type=click.Choice(["auto", "f32", "f16", "bf16"]),
    default="auto",
    show_default=True,
    help="auto: bf16 on CUDA, f16 on MPS, f32 on CPU.",
)
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4"]),
    default=None,
    help="Quantize linear weights while loading: int8 per channel or int4 in groups of 32 "
    "(the head int8). auto --dtype then computes in bf16. Weights stored quantized (GGUF, "
    "quantized bundles) are used as they are.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto|cpu|cuda|cuda:N|mps. auto: CUDA, else MPS, else CPU.",
)
@click.option(
    "--kernels",
    default="auto",
    show_default=True,
    help="Kernels for quantized weights: auto (measured on this machine at the first load, "
    "then remembered), or torch|avx2|dequant-gemm|fbgemm|dense to run that one wherever it "
    "can (dense holds the weights dequantized: more memory); list: show the candidates here "
    "and the measured choices, then exit.",
)
@click.option(
    "--no-weight-cache",
    is_flag=True,
    envvar="CAKE_NO_WEIGHT_CACHE",
    help="Convert and pack a GGUF's weights at every start instead of mapping the packed copy "
    "kept in the cache folder after the first (or set CAKE_NO_WEIGHT_CACHE=1).",
)
@click.option(
    "--no-mmap",
    is_flag=True,
    envvar="CAKE_NO_MMAP",
    help="Read and convert a GGUF's Q4_0/Q4_1/Q8_0 weights instead of running them where they "
    "lie in the mapped file (for a file on a slow network filesystem; or set CAKE_NO_MMAP=1).",
)
@click.option(
    "--weight-cache-size",
    default=None,
    metavar="SIZE",
    callback=lambda ctx, param, value: _parse_size(value, "--weight-cache-size"),
    help="Most bytes the packed-weight cache keeps, least recently used removed first, e.g. "
    "20G (default: a quarter of the disk that holds it).",
)
@click.option(
    "--cache-info",
    is_flag=True,
    help="Print the cache folder, its folders' sizes and the packed weights per model, then exit.",
)
@click.option(
    "--clear-weight-cache",
    is_flag=True,
    help="Remove every packed weight from the cache (the next start packs again), then exit.",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Context length the KV caches hold (default: the model's, at most 4096).",
)
@click.option(
    "--kv-memory",
    default=None,
    metavar="SIZE",
    help="Bytes all sessions' KV caches may take here: 2GiB, 512MiB, 800MB, or a share of "
    "free memory such as 30% (default: 50% of what is free after loading).",
)
@click.option(
    "--prefill-chunk",
    default=512,
    show_default=True,
    type=click.IntRange(min=1),
    help="Master: prompt positions sent through the stages per request.",
)
@click.option(
    "--perplexity",
    "perplexity_file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    metavar="FILE",
    help="Score a text file (tokenized like --raw, windows of 1024 tokens) instead of "
    "generating; the last stdout line is 'perplexity: X (N tokens)'.",
)
@click.option(
    "--max-sessions",
    default=32,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker mode: most sessions (generations) held at once.",
)
@click.option(
    "--idle-timeout",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Worker mode: close a connection silent for this many seconds.",
)
@click.option(
    "--connect-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Master: seconds to reach each worker.",
)
@click.option(
    "--cluster-key",
    envvar="CAKE_CLUSTER_KEY",
    default=None,
    help="Shared secret for master-worker authentication (or set CAKE_CLUSTER_KEY).",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False),
    default=None,
    help="Worker mode: TLS certificate (PEM) to serve with.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False),
    default=None,
    help="Worker mode: TLS private key (PEM).",
)
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False),
    default=None,
    help="Master: CA (or the worker's own certificate) to trust; turns TLS on.",
)
@click.option(
    "--retry-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Master: seconds to wait for a lost worker to come back mid-generation.",
)
@click.option(
    "--heartbeat-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Master: a worker silent this long (pings unanswered) is treated as lost.",
)
@click.option(
    "--debug-round-trip-per-block",
    is_flag=True,
    hidden=True,
    help="Benchmarks only: one round trip per block instead of per worker run.",
)
@click.option(
    "--api",
    "api_address",
    default=None,
    metavar="HOST:PORT",
    help="Serve an OpenAI-compatible HTTP API here instead of answering --prompt.",
)
@click.option(
    "--api-key",
    envvar="CAKE_API_KEY",
    default=None,
    help="Require this Bearer token on the HTTP API (or set CAKE_API_KEY).",
)
@click.option(
    "--max-concurrent",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="HTTP API: most requests generating at once (more get HTTP 429).",
)
@click.option(
    "--prefix-cache/--no-prefix-cache",
    default=True,
    show_default=True,
    help="Keep finished conversations' KV caches (under --kv-memory, least recently used "
    "evicted first) so a prompt that starts the same way computes only the rest: the next "
    "turn of a chat, an agent's growing history, a shared system prompt.",
)
@click.option(
    "--batching/--no-batching",
    default=True,
    show_default=True,
    help="HTTP API: run the next step of every active request as one batch per stage.",
)
@click.option(
    "--batch-groups",
    type=click.IntRange(min=1),
    default=None,
    help="HTTP API: disjoint groups of requests in flight at once, so that several remote "
    "stages compute at the same time (pipelining). Default: one per remote stage.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for tensor work (default: torch's choice, one per core).",
)
@click.option(
    "--workers",
    default=None,
    metavar="HOST:PORT[,...]",
    help="Master: empty workers to measure, plan blocks onto, push tensors to (no --topology).",
)
@click.option(
    "--discover",
    is_flag=True,
    help="Master: find empty workers with the same --cluster-key on the LAN (UDP broadcast).",
)
@click.option(
    "--discovery-timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Master: seconds --discover listens for workers.",
)
@click.option(
    "--min-workers",
    type=click.IntRange(min=1),
    default=None,
    help="Master: --discover stops as soon as this many workers answered.",
)
@click.option(
    "--discovery-port",
    default=10129,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="UDP port of --discover; an empty worker answers on it (0: it does not).",
)
@click.option(
    "--plan",
    "plan_only",
    is_flag=True,
    help="Master: print the measured plan as topology.yml on stdout and exit.",
)
@click.option(
    "--master-blocks",
    type=click.IntRange(min=0),
    default=None,
    help="Master with --workers: most blocks the master runs itself (default: what fits).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Empty worker: where pushed tensors are kept (default: $CAKE_CACHE_DIR/pushed).",
)
@click.option(
    "--max-memory",
    default=None,
    metavar="SIZE",
    callback=lambda ctx, param, value: _parse_size(value),
    help="Empty worker: most memory it offers for blocks, e.g. 6G or 512M (default: 90% free).",
)
@click.option(
    "--thread-wait",
    type=click.Choice(["auto", "spin", "sleep"]),
    default="auto",
    show_default=True,
    help="Idle CPU threads spin (fast, one process per machine) or sleep (stages share the "
    "cores). auto: sleep when workers run on this host, the HTTP API serves, or --colocated.",
)
@click.option(
    "--colocated",
    is_flag=True,
    envvar="CAKE_COLOCATED",
    help="Worker mode: other stages (master, workers) share this machine's cores; idle "
    "threads sleep (or set CAKE_COLOCATED=1).",
)
@click.option(
    "--draft",
    default=None,
    metavar="lookup|PATH",
    help="Speculative decoding: 'lookup' drafts from the prompt and text so far; PATH is a small "
    "draft model (folder, .gguf or hub name, as --model) with the same tokenizer, run on the "
    "master. Same output, fewer round trips.",
)
@click.option(
    "--draft-tokens",
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="Tokens to draft per round; auto adapts to acceptance and round-trip time and drafts "
    "nothing when it does not pay.",
)
@click.option(
    "--stats", "show_stats", is_flag=True, help="Per-stage compute and wire time, drafting counts."
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def main(**opts: object) -> None:
    """Run a Llama-3-family model, whole or split across worker machines."""
    _setup_logging(bool(opts["verbose"]))
    try:
        _setup_threads(opts)
        if _setup_kernels(opts) or _setup_weight_cache(opts):
            return
        if opts["mode"] == "worker":
            if opts["model"] is None and opts["topology"] is None:
                asyncio.run(_run_empty_worker(opts))
            else:
                asyncio.run(_run_worker(opts))
            return
        if opts["model"] is None:
            raise ValueError("--model is required (only an empty worker starts without one)")
        topology, replanning = opts["topology"], None
        if opts["workers"] or opts["discover"]:
            cluster = asyncio.run(_plan_cluster(opts))
            if opts["plan_only"]:
                sys.stdout.write(cluster.plan_yaml)
                return
            topology, replanning = cluster.topology, cluster.replanning
        elif opts["plan_only"]:
            raise ValueError("--plan needs --workers or --discover (the workers to plan for)")
        if opts["api_address"]:
            asyncio.run(_run_api(opts, topology, replanning))
        elif opts["perplexity_file"]:
            asyncio.run(_run_perplexity(_master_settings(opts, topology, replanning), opts))
        elif opts["prompt"] is None and sys.stdin.isatty() and sys.stdout.isatty():
            _run_chat(_master_settings(opts, topology, replanning), opts)
        else:
            asyncio.run(_run_master(_master_settings(opts, topology, replanning), opts))
    except (CakeError, ValueError) as exc:  # each says its cause and fix: one line, no traceback
        _fail(str(exc))
    except ReaderGone:  # `cake-cli … | head`: the reader has what it wanted
        silence_stdout()
        sys.exit(READER_GONE_EXIT)
    except OSError as exc:  # a full disk, a port taken after all, ...: one line, no traceback
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)


def _master_settings(opts: dict, topology: object, replanning: object, **serving: Any) -> Any:
    """The master's typed settings from the CLI's options (`serving`: the HTTP API's)."""
    from cake.master import MasterSettings
    from cake.wire.liveness import LivenessSettings

    options = dict(
        model=opts["model"],
        topology=topology,
        device=opts["device"],
        dtype=opts["dtype"],
        max_seq_len=opts["max_seq_len"],
        quantize=opts["quantize"],
        kv_memory=opts["kv_memory"],
        prefill_chunk=opts["prefill_chunk"],
        connect_timeout=opts["connect_timeout"],
        retry_timeout=opts["retry_timeout"],
        liveness=LivenessSettings.for_heartbeat_timeout(opts["heartbeat_timeout"]),
        cluster_key=opts["cluster_key"],
        tls_ca=opts["tls_ca"],
        draft=opts["draft"],
        draft_tokens=opts["draft_tokens"],
        round_trip_per_block=opts["debug_round_trip_per_block"],
        replanning=replanning,
        prefix_cache=opts["prefix_cache"],
    )
    return MasterSettings.serving(**options, **serving) if serving else MasterSettings(**options)


def _generation(opts: dict) -> Any:
    """-n, --ignore-eos and the sampling options: what every generation of this run gets."""
    from cake.decoding.generate import GenerationOptions
    from cake.decoding.sampling import SamplingParams

    params = SamplingParams(
        temperature=opts["temperature"],
        top_k=opts["top_k"],
        top_p=opts["top_p"],
        repeat_penalty=opts["repeat_penalty"],
        repeat_last_n=opts["repeat_last_n"],
        seed=opts["seed"],
    )
    return GenerationOptions(params, opts["sample_len"], opts["ignore_eos"])


async def _run_master(settings: Any, opts: dict) -> None:
    from cake.decoding.stats import GenerationStats, describe_expert_load
    from cake.master import Master
    from cake.model.detokenizer import StreamDecoder

    options = _generation(opts)
    master = await Master.open(settings)
    try:
        prompt = opts["prompt"] if opts["prompt"] is not None else sys.stdin.read().strip()
        prompt_ids = master.encode(prompt, opts["system_prompt"], opts["raw"])
        if not prompt:
            raise ValueError(
                "no prompt: pass --prompt TEXT, pipe one into stdin "
                "(echo 'question' | cake-cli ...), or run on a terminal to chat"
            )
        stats = GenerationStats()
        decoder = StreamDecoder(master.tokenizer)
        out = TextOutput()
        tokens = master.generate(
            prompt_ids, options.params, options.max_new_tokens, options.ignore_eos, stats
        )
        try:
            # aclosing: a failed write (reader gone, disk full) closes the sessions right away
            async with contextlib.aclosing(tokens):
                async for token in tokens:
                    out.write(decoder.push(token))
        finally:  # on a failure too: what was generated stays on stdout, then the error
            if decoder.ids and not out.gone:
                out.write(decoder.finish() + "\n")
        if opts["show_stats"]:
            kernels = master.local_kernels()
            if kernels:
                click.echo(f"kernels on the master: {kernels}", err=True)
            for label, rows in master.expert_load().items():
                click.echo(f"experts on {label}: {describe_expert_load(rows)}", err=True)
            for line in stats.stage_lines():
                log.info(line)
        click.echo(stats.summary(), err=True)
    finally:
        await master.close()


def _run_chat(settings: Any, opts: dict) -> None:
    from cake.faces.terminal_chat import run_terminal_chat

    if opts["raw"]:
        raise ValueError("--raw has no meaning in a chat (it needs the chat template); "
                         "pass the text with --prompt instead")  # fmt: skip
    run_terminal_chat(settings, _generation(opts), opts["system_prompt"])


async def _run_perplexity(settings: Any, opts: dict) -> None:
    from cake.decoding.perplexity import read_text_file
    from cake.master import Master

    text = read_text_file(opts["perplexity_file"])
    master = await Master.open(settings)
    try:
        result = await master.perplexity(master.encode(text, raw=True))
    finally:
        await master.close()
    click.echo(result.line())


async def _run_api(opts: dict, topology: object, replanning: object) -> None:
    from cake.faces.api import ApiDefaults, ApiSettings, model_id, serve_api

    remote_groups = opts["batch_groups"]  # None: one per remote stage (see MasterSettings)
    settings = _master_settings(
        opts, topology, replanning, batching=opts["batching"], batch_groups=remote_groups
    )
    options = _generation(opts)
    defaults = ApiDefaults(
        max_tokens=options.max_new_tokens,
        top_k=options.params.top_k,
        repeat_penalty=options.params.repeat_penalty,
        repeat_last_n=options.params.repeat_last_n,
        seed=options.params.seed,
        ignore_eos=options.ignore_eos,
    )
    api = ApiSettings(
        opts["api_address"],
        model_id(opts["model"]),
        opts["api_key"],
        opts["max_concurrent"],
        defaults,
    )
    await serve_api(settings, api)


async def _run_worker(opts: dict) -> None:
    from cake.worker import start_worker

    await start_worker(
        opts["model"],
        opts["name"],
        opts["topology"],
        opts["address"],
        device=opts["device"],
        dtype=opts["dtype"],
        max_seq_len=opts["max_seq_len"],
        max_sessions=opts["max_sessions"],
        idle_timeout=opts["idle_timeout"],
        cluster_key=opts["cluster_key"],
        tls_cert=opts["tls_cert"],
        tls_key=opts["tls_key"],
        quantize=opts["quantize"],
        kv_memory=opts["kv_memory"],
        ready_file=opts["ready_file"],
    )


async def _run_empty_worker(opts: dict) -> None:
    from cake.cluster.empty_worker import start_empty_worker

    await start_empty_worker(
        opts["address"],
        opts["cluster_key"],
        opts["cache_dir"],
        name=opts["name"],
        device=opts["device"],
        max_sessions=opts["max_sessions"],
        idle_timeout=opts["idle_timeout"],
        tls_cert=opts["tls_cert"],
        tls_key=opts["tls_key"],
        discovery_port=opts["discovery_port"],
        max_memory=opts["max_memory"],
        ready_file=opts["ready_file"],
    )


async def _plan_cluster(opts: dict) -> Any:
    """--workers / --discover: measure, plan, push, assign (see cake/cluster/assemble.py)."""
    from cake.cluster.assemble import Discovery, assemble_cluster
    from cake.cluster.setup import ClusterOptions
    from cake.wire.auth import client_tls
    from cake.wire.auth import cluster_key as parse_key

    if opts["topology"]:
        raise ValueError("give --topology (blocks by hand) or --workers/--discover, not both")
    key = parse_key(opts["cluster_key"])
    if key is None:
        raise ValueError("--workers and --discover need --cluster-key (or CAKE_CLUSTER_KEY)")
    options = ClusterOptions(
        workers=[w.strip() for w in (opts["workers"] or "").split(",") if w.strip()],
        cluster_key=key,
        tls=client_tls(opts["tls_ca"]),
        device=opts["device"],
        dtype=opts["dtype"],
        quantize=opts["quantize"],
        max_seq_len=opts["max_seq_len"],
        master_blocks=opts["master_blocks"],
        connect_timeout=opts["connect_timeout"],
        retry_timeout=opts["retry_timeout"],
    )
    discovery = (
        Discovery(opts["discovery_timeout"], opts["min_workers"], opts["discovery_port"])
        if opts["discover"]
        else None
    )
    return await assemble_cluster(opts["model"], options, discovery, plan_only=opts["plan_only"])


def _parse_size(value: str | None, option: str = "--max-memory") -> int | None:
    """--max-memory, --weight-cache-size: a size as cake.host.sizes reads it (8G = 8 GiB,
    8GB = 8*10**9 bytes)."""
    if value is None:
        return None
    from cake.host.sizes import parse_size

    try:
        return parse_size(value, option)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--model-path",
    required=True,
    help="Hugging Face model folder, a .gguf file, or a hub name (as cake-cli's --model; only "
    "the shards the bundles hold are fetched).",
)
@click.option(
    "--topology",
    required=True,
    type=click.Path(dir_okay=False),
    help="topology.yml: which blocks each worker serves.",
)
@click.option(
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to write OUTPUT/<worker>/ and OUTPUT/master/ bundles into.",
)
@click.option(
    "--worker",
    "workers",
    multiple=True,
    help="Only this worker's bundle (repeatable). Default: every worker and the master.",
)
@click.option("--force", is_flag=True, help="Replace bundles that already exist in --output.")
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4"]),
    default=None,
    help="Store linear weights quantized (int8 per channel, int4 in groups of 32; the head "
    "int8), block by block; workers then load them as they are.",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def split_main(
    model_path: str,
    topology: str,
    output: str,
    workers: tuple[str, ...],
    force: bool,
    quantize: str | None,
    verbose: bool,
) -> None:
    """Write self-contained per-worker bundles: each worker gets only its blocks."""
    _setup_logging(verbose)
    from cake.split import split_model

    try:
        split_model(
            model_path,
            topology,
            output,
            workers=list(workers) or None,
            force=force,
            quantize=quantize,
        )
    except (CakeError, ValueError) as exc:  # a bad model folder or topology, among others
        _fail(str(exc))
    except OSError as exc:  # a full disk, no permission: the output folder is as it was
        where = exc.filename or output
        _fail(f"{where}: {exc.strerror or exc}; nothing was written to {output}")


if __name__ == "__main__":
    main()
