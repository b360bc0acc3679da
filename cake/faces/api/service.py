"""The model behind the routes: admission, prompt encoding, generations and health.

Each request is its own session (`Master.generate` opens one on the master and on every
worker), so requests only share compute, and the stages pipeline their steps. The order for a
request is fixed: admission (at most `max_concurrent` at once, more get 429 before any work),
then the prompt's encoding on the tokenizer thread, then the length checks, then the generation
as its own task. A generation is stopped *between* two steps: a client that goes away never
interrupts a forward that a worker is still computing, and `Master.generate`'s `finally` closes
the session everywhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from cake.decoding.grammar import GrammarError, GrammarSpec, check_grammar, token_bytes
from cake.decoding.logprobs import TokenLogprobs
from cake.decoding.sampling import SamplingParams
from cake.decoding.speculative import DraftSettings, request_draft
from cake.decoding.stats import GenerationStats
from cake.faces.api.errors import ApiError, generation_error
from cake.faces.api.schemas import ApiDefaults, GenerationRequest
from cake.master import Master
from cake.model.detokenizer import StreamDecoder
from cake.model.tokenizer import encode_chat

T = TypeVar("T")


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int  # tokens generated, up to a stop string's cut
    cached_tokens: int = 0  # of the prompt's, reused from the prefix cache
    stop: str | None = None  # the stop string that ended it, if one did

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


@dataclass(frozen=True)
class Piece:
    """Text as it streams, and the logprobs of the tokens it came from (when they were asked:
    a token whose text is still held back has its logprobs in the piece that sends it)."""

    text: str
    logprobs: tuple[TokenLogprobs, ...] = ()


Event = Piece | Finished | BaseException  # a text piece; the end; or what went wrong


class Admission:
    """One request's place among the `max_concurrent`, held from before its prompt is encoded
    until its generation ends (or it fails before one starts)."""

    def __init__(self, holders: set[Admission]) -> None:
        self._holders = holders
        holders.add(self)

    def release(self) -> None:
        self._holders.discard(self)


class Generation:
    """One request's generation, as a task that hands text pieces to the response.

    `stop()` takes effect after the step in flight: stopping inside a forward would leave a
    worker computing for a session that the next message closes.
    """

    def __init__(
        self,
        tokens: AsyncIterator[int],
        stats: GenerationStats,
        decoder: StreamDecoder,
        prompt_tokens: int,
        logprobs: bool = False,
    ) -> None:
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._stopped = False
        self._logprobs = logprobs
        self.task = asyncio.create_task(self._run(tokens, stats, decoder, prompt_tokens))

    def stop(self) -> None:
        self._stopped = True

    async def _run(
        self,
        tokens: AsyncIterator[int],
        stats: GenerationStats,
        decoder: StreamDecoder,
        prompt_tokens: int,
    ) -> None:
        count = 0
        held: list[TokenLogprobs] = []  # of the tokens whose text is not sent yet
        try:
            async for token in tokens:
                count += 1
                if self._logprobs:
                    held.append(stats.logprobs[count - 1])
                text = decoder.push(token)
                if text:
                    self.events.put_nowait(Piece(text, tuple(held)))
                    held.clear()
                if decoder.stopped or self._stopped:
                    break
            else:
                text = decoder.finish()
                if text or held:
                    self.events.put_nowait(Piece(text, tuple(held)))
            reason = "stop" if decoder.stopped else stats.finish_reason
            stop = decoder.stop_filter.matched
            finished = Finished(reason, prompt_tokens, count, stats.cached_tokens, stop)
            self.events.put_nowait(finished)
        except Exception as exc:
            self.events.put_nowait(exc)
        finally:
            await tokens.aclose()  # closes the session on the master and every worker


class Service:
    """The model's id and defaults, the requests admitted now, and their generations."""

    def __init__(
        self, master: Master, model_name: str, max_concurrent: int, defaults: ApiDefaults
    ) -> None:
        self.master = master
        self.model_name = model_name
        self.max_concurrent = max_concurrent
        self.defaults = defaults
        self.created = int(time.time())
        self.running: set[Admission] = set()
        self.generations: set[Generation] = set()
        # One thread: tokenizers are not safe to share between threads, and a long prompt's
        # encoding must not stall the event loop (the other streams).
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="cake-tokenize")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "cake",
        }

    def admit(self) -> Admission:
        """A place for one request now, or 429 (no queue: clients retry)."""
        if len(self.running) >= self.max_concurrent:
            raise ApiError(
                429,
                f"{len(self.running)} requests are generating, the most this server runs at "
                "once (--max-concurrent); retry later",
                type="rate_limit_error",
                code="too_many_requests",
            )
        return Admission(self.running)

    async def _on_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, fn, *args)

    async def on_tokenizer_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Tokenizer work of a caller's own (a conversation with tools, say), on its thread."""
        return await self._on_tokenizer_thread(fn, *args)

    async def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied as the CLI does for --prompt."""
        return await self._on_tokenizer_thread(encode_chat, self.master.tokenizer, messages)

    async def encode_completion(self, prompt: str | list[str] | list[int]) -> list[int]:
        """Token ids as they are, or the text encoded as the CLI's --raw does (BOS, no
        template)."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            vocab = self.master.config.vocab_size
            bad = [t for t in prompt if not 0 <= int(t) < vocab]
            if bad:
                raise ApiError(
                    400,
                    f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})",
                    param="prompt",
                )
            return [int(t) for t in prompt]
        text = prompt if isinstance(prompt, str) else str(prompt[0]) if prompt else ""
        return await self._on_tokenizer_thread(self.master.encode, text, None, True)

    def completion_budget(self, prompt_tokens: int, requested: int | None, param: str) -> int:
        """How many tokens to generate at most: what was asked if prompt and completion fit
        the context (else 400, as OpenAI answers), or the server's default, cut to the
        context."""
        context = self.master.max_seq_len
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty", param=param)
        if prompt_tokens >= context:
            raise ApiError(
                400,
                f"the prompt has {prompt_tokens} tokens, but the context holds {context}; "
                "shorten it (or start the server with a larger --max-seq-len)",
                param=param,
                code="context_length_exceeded",
            )
        if requested is None:
            return min(self.defaults.max_tokens, context - prompt_tokens)
        if prompt_tokens + requested > context:
            raise ApiError(
                400,
                f"the context holds {context} tokens, but {prompt_tokens + requested} were "
                f"asked for ({prompt_tokens} in the prompt, {requested} to generate); lower "
                "max_tokens or shorten the prompt",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested

    async def check_request(
        self, grammar: GrammarSpec | None, logprobs: int | None, grammar_param: str | None = None
    ) -> None:
        """Compile the grammar (400 naming `grammar_param`, response_format unless said, if it
        cannot be) and ready the token bytes logprobs report, on the tokenizer thread: both
        build llguidance's tokenizer on first use (~0.3 s)."""
        try:
            if grammar is not None:
                await self._on_tokenizer_thread(check_grammar, grammar, self.master.tokenizer)
            if logprobs is not None:
                await self._on_tokenizer_thread(token_bytes, self.master.tokenizer, 0)
        except GrammarError as exc:
            raise ApiError(400, str(exc), param=grammar_param or "response_format") from None

    def token_bytes(self, token: int) -> bytes:
        return token_bytes(self.master.tokenizer, token)

    def draft_settings(self, request: GenerationRequest) -> DraftSettings | None:
        """The request's speculative decoding (cake_draft, cake_draft_tokens), or the server's."""
        try:
            return request_draft(
                self.master.drafting,
                request.cake_draft,
                request.cake_draft_tokens,
                self.master.draft_model is not None,
            )
        except ValueError as exc:
            raise ApiError(400, str(exc), param="cake_draft") from None

    async def start(
        self,
        admission: Admission,
        prompt_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        stops: Sequence[str],
        param: str,
        draft: DraftSettings | None = None,
        *,
        grammar: GrammarSpec | None = None,
        logprobs: int | None = None,
    ) -> tuple[Generation, Event]:
        """Start a generation (which releases `admission` when it ends) and wait for its first
        event, so that a worker that is gone is answered with an HTTP status, not inside a
        started stream."""
        # (its first construction probes the tokenizer: tokenizer work, so on its thread)
        decoder = await self._on_tokenizer_thread(StreamDecoder, self.master.tokenizer, stops)
        stats = GenerationStats()
        tokens = self.master.generate(
            prompt_ids,
            params,
            max_tokens,
            self.defaults.ignore_eos,
            stats,
            draft,
            grammar=grammar,
            logprobs=logprobs,
        )
        generation = Generation(tokens, stats, decoder, len(prompt_ids), logprobs is not None)
        self.generations.add(generation)

        def ended(_: asyncio.Task) -> None:
            self.generations.discard(generation)
            admission.release()

        generation.task.add_done_callback(ended)
        try:
            first = await generation.events.get()
        except BaseException:
            generation.stop()
            raise
        if isinstance(first, BaseException):
            raise generation_error(first, param)
        return generation, first

    async def close(self) -> None:
        """Cancel what still runs (the server is going down), so sessions close before the
        master does."""
        tasks = [generation.task for generation in self.generations]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """Every stage and whether it can serve now (a lost worker gets one reconnection
        attempt: see Stage.health)."""
        stages = []
        for health in await self.master.health():
            stage: dict[str, Any] = {
                "stage": health.label,
                "blocks": f"{health.blocks.start}-{health.blocks.stop - 1}",
            }
            if health.worker is not None:
                stage |= {"worker": health.worker, "address": health.address}
            stages.append(stage | {"connected": health.up})
        ok = all(stage["connected"] for stage in stages)
        return ok, {
            "status": "ok" if ok else "unavailable",
            "model": self.model_name,
            "running": len(self.running),
            "max_concurrent": self.max_concurrent,
            "stages": stages,
        }
