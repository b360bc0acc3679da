"""`cake-cli --model M [--topology T]` on a terminal, without --prompt: a multi-turn chat.

The person types at a `>>> ` marker (line editing and history from `readline`), the answer
streams to stdout, and the conversation so far is the context of the next answer. `/reset`
starts over, `/exit` or Ctrl-D leaves, Ctrl-C stops an answer and keeps the chat.

Threads: the master (its worker links, their heartbeats, the generation) lives on an asyncio
loop in a background thread; the main thread owns the terminal. So `input()` can block with
readline's full editing while the links stay serviced, and Ctrl-C (always delivered to the main
thread) only sets a flag that the generation checks between two steps: an answer never stops
inside a worker's forward, and its sessions close everywhere as after any other answer.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import IO, Any, TypeVar

from cake.decoding.generate import GenerationOptions
from cake.decoding.stats import GenerationStats
from cake.errors import ContextError, WorkerError
from cake.master import Master, MasterSettings
from cake.model.detokenizer import StreamDecoder
from cake.model.tokenizer import encode_chat

T = TypeVar("T")

MARKER = ">>> "
HELP = "/reset starts a new conversation, /exit or Ctrl-D leaves, Ctrl-C stops an answer."


class Conversation:
    """The messages so far, encoded with the chat template for each new turn.

    `reserve` is the room a new answer needs: a turn whose prompt leaves less than that of the
    context starts a fresh conversation (the system prompt stays), with a notice that says so.
    """

    def __init__(
        self, tokenizer: Any, max_seq_len: int, reserve: int, system_prompt: str | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.reserve = reserve
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.messages: list[dict[str, str]] = list(self.system)

    @property
    def turns(self) -> int:
        """Questions answered so far in this conversation."""
        return sum(1 for m in self.messages if m["role"] == "user")

    def reset(self) -> None:
        self.messages = list(self.system)

    def prompt_for(self, question: str) -> tuple[list[int], str | None]:
        """The token ids that ask `question` after the conversation so far, and a notice when
        the conversation had to start over to make room. Raises ContextError when the question
        alone does not fit."""
        ids = encode_chat(self.tokenizer, [*self.messages, _user(question)])
        notice = None
        if len(ids) + self.reserve > self.max_seq_len and self.turns:
            notice = (
                f"the conversation has reached {len(ids)} of the {self.max_seq_len} tokens the "
                "context holds: starting a fresh conversation (earlier turns are forgotten)"
            )
            self.reset()
            ids = encode_chat(self.tokenizer, [*self.messages, _user(question)])
        if len(ids) >= self.max_seq_len:
            raise ContextError(
                f"this message is {len(ids)} tokens with the template, but the context holds "
                f"{self.max_seq_len}: shorten it or raise --max-seq-len"
            )
        return ids, notice

    def add_turn(self, question: str, answer: str) -> None:
        self.messages += [_user(question), {"role": "assistant", "content": answer}]


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


class LoopThread:
    """An asyncio loop running in a daemon thread; `run` waits for a coroutine's result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cake-loop", daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@dataclass
class Answer:
    text: str
    tokens: int
    tokens_per_s: float  # decode speed, after the prompt's prefill (as --stats reports it)
    stopped: bool  # by Ctrl-C


class TerminalChat:
    """The read-answer loop over one master (which the caller opens and closes)."""

    def __init__(
        self,
        master: Master,
        loop: LoopThread,
        options: GenerationOptions,
        system_prompt: str | None = None,
        out: IO[str] = sys.stdout,
        err: IO[str] = sys.stderr,
    ) -> None:
        self.master = master
        self.loop = loop
        self.options = options
        self.model_name = master.name
        reserve = min(options.max_new_tokens, master.max_seq_len // 2)
        self.conversation = Conversation(
            master.tokenizer, master.max_seq_len, reserve, system_prompt
        )
        self.out = out
        self.err = err
        self.stop_requested = threading.Event()

    def say(self, text: str) -> None:
        """A line for the person (not generated text): on stderr, like every other message."""
        print(text, file=self.err, flush=True)

    def run(self) -> None:
        self.say(f"cake chat with {self.model_name} ({self.master.max_seq_len} tokens "
                 f"of context). {HELP}")  # fmt: skip
        while True:
            try:
                line = input(MARKER)
            except EOFError:  # Ctrl-D
                print(file=self.out, flush=True)
                return
            except KeyboardInterrupt:  # Ctrl-C at the marker drops the line, as a shell does
                print(file=self.out, flush=True)
                continue
            question = line.strip()
            if not question:
                continue
            if question.startswith("/"):
                if self.command(question):
                    return
                continue
            self.ask(question)

    def command(self, text: str) -> bool:
        """Run a /command; True when the chat should end."""
        name = text.split()[0].lower()
        if name in ("/exit", "/quit", "/bye"):
            return True
        if name in ("/reset", "/clear", "/new"):
            self.conversation.reset()
            self.say("(new conversation)")
        elif name == "/help":
            self.say(HELP)
        else:
            self.say(f"unknown command {name}: {HELP}")
        return False

    def ask(self, question: str) -> None:
        try:
            ids, notice = self.conversation.prompt_for(question)
        except ContextError as exc:
            self.say(f"error: {exc}")
            return
        if notice:
            self.say(f"({notice})")
        try:
            answer = self.wait(self.answer(ids))
        except (WorkerError, ContextError) as exc:
            self.say(f"error: {exc}")
            return
        self.conversation.add_turn(question, answer.text)
        end = "stopped" if answer.stopped else f"{answer.tokens_per_s:.1f} tok/s"
        self.say(f"[{answer.tokens} tokens, {end}]")

    def wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """The coroutine's result; Ctrl-C meanwhile asks it to stop and waits for it to."""
        self.stop_requested.clear()
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop.loop)
        while True:
            try:
                return future.result()
            except KeyboardInterrupt:
                self.stop_requested.set()

    async def answer(self, ids: list[int]) -> Answer:
        """Stream one answer to `out`, stopping after the step in flight once asked to."""
        decoder = StreamDecoder(self.master.tokenizer)
        stats = GenerationStats()
        options = self.options
        tokens = self.master.generate(
            ids, options.params, options.max_new_tokens, options.ignore_eos, stats
        )
        stopped = False
        pieces: list[str] = []  # the answer's text, as streamed
        try:
            async for token in tokens:
                pieces.append(decoder.push(token))
                self._write(pieces[-1])
                if self.stop_requested.is_set():
                    stopped = True
                    break
        finally:
            await tokens.aclose()  # closes the session on the master and every worker
            pieces.append(decoder.finish())
            self._write(pieces[-1] + "\n")
        return Answer("".join(pieces), stats.new_tokens, stats.decode_tok_s, stopped)

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def run_terminal_chat(
    settings: MasterSettings, options: GenerationOptions, system_prompt: str | None = None
) -> None:
    """Open the master (as `cake-cli --prompt` does), chat until the person leaves, close."""
    import readline  # noqa: F401  (importing it gives input() line editing and history)

    loop = LoopThread()
    try:
        master = loop.run(Master.open(settings))
        try:
            TerminalChat(master, loop, options, system_prompt).run()
        finally:
            loop.run(master.close())
    finally:
        loop.close()
