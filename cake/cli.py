"""`cake-cli` and `cake-split-model`: options in, one function per mode. No torch at import time.

Generated text goes to stdout and nothing else does; logs and statistics go to stderr.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import click

from cake.config import ModelFolderError
from cake.errors import ContextError, WorkerError
from cake.topology import TopologyError

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


def _setup_threads(threads: int | None) -> None:
    """Before torch is imported: idle OpenMP threads sleep instead of spinning.

    By default they spin for a while after each parallel region. With the stages of a pipeline
    on one machine (or anything else running beside cake), a process that has finished its step
    then burns the core the next stage needs: decode ran 3x slower in our measurements. Set
    OMP_WAIT_POLICY=ACTIVE yourself to get spinning back on a dedicated machine.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model", required=True, help="Hugging Face model folder, or a .gguf file.")
@click.option(
    "--mode",
    type=click.Choice(["master", "worker"]),
    default="master",
    show_default=True,
    help="master: embed, sample and print text; worker: serve this node's blocks over TCP.",
)
@click.option("--name", help="Worker mode: this worker's node name in the topology.")
@click.option(
    "--topology", type=click.Path(dir_okay=False), help="topology.yml (blocks per worker)."
)
@click.option("--address", help="Worker mode: HOST:PORT to listen on (default: its topology host).")
@click.option("--prompt", default="Why is the sky blue?", show_default=True)
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
    "--device",
    default="auto",
    show_default=True,
    help="auto|cpu|cuda|cuda:N|mps. auto: CUDA, else MPS, else CPU.",
)
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=1),
    default=None,
    help="Context length the KV caches hold (default: the model's, at most 4096).",
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
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for tensor work (default: torch's choice, one per core).",
)
@click.option(
    "--draft",
    default=None,
    metavar="lookup|PATH",
    help="Speculative decoding: 'lookup' drafts from the prompt and text so far; PATH is a small "
    "draft model (folder or .gguf) with the same tokenizer, run on the master. Same output, "
    "fewer round trips.",
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
    _setup_threads(opts["threads"])
    try:
        if opts["mode"] == "worker":
            asyncio.run(_run_worker(opts))
        elif opts["api_address"]:
            asyncio.run(_run_api(opts))
        else:
            asyncio.run(_run_master(opts))
    except (ModelFolderError, TopologyError, ValueError, WorkerError, ContextError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(130)


async def _run_master(opts: dict) -> None:
    from cake.chat import StreamDecoder
    from cake.master import GenerationStats, Master
    from cake.sampling import SamplingParams

    params = SamplingParams(
        temperature=opts["temperature"],
        top_k=opts["top_k"],
        top_p=opts["top_p"],
        repeat_penalty=opts["repeat_penalty"],
        repeat_last_n=opts["repeat_last_n"],
        seed=opts["seed"],
    )
    master = await Master.from_options(opts)
    try:
        prompt_ids = master.encode(opts["prompt"], opts["system_prompt"], opts["raw"])
        stats = GenerationStats()
        decoder = StreamDecoder(master.tokenizer)
        out = sys.stdout
        try:
            async for token in master.generate(
                prompt_ids, params, opts["sample_len"], opts["ignore_eos"], stats
            ):
                piece = decoder.push(token)
                if piece:
                    out.write(piece)
                    out.flush()
        finally:  # on a failure too: what was generated stays on stdout, then the error
            if decoder.ids:
                out.write(decoder.finish() + "\n")
                out.flush()
        if opts["show_stats"]:
            for line in stats.stage_lines():
                log.info(line)
        click.echo(stats.summary(), err=True)
    finally:
        await master.close()


async def _run_api(opts: dict) -> None:
    from cake.api import serve_api

    await serve_api(opts)


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
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--model-path", required=True, help="Hugging Face model folder, or a .gguf file.")
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
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def split_main(
    model_path: str,
    topology: str,
    output: str,
    workers: tuple[str, ...],
    force: bool,
    verbose: bool,
) -> None:
    """Write self-contained per-worker bundles: each worker gets only its blocks."""
    _setup_logging(verbose)
    from cake.split import split_model

    try:
        split_model(model_path, topology, output, workers=list(workers) or None, force=force)
    except (ModelFolderError, TopologyError, ValueError, OSError) as exc:
        _fail(str(exc))


if __name__ == "__main__":
    main()
