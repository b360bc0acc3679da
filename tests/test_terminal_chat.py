"""`cake-cli` without --prompt: a chat on a terminal (driven through tmux), stdin otherwise."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cake.cli import main
from cake.errors import ContextError
from cake.faces.terminal_chat import MARKER, Conversation
from cake.model.tokenizer import encode_chat, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
QUESTION = "What is the capital of France?"


# --- the conversation as context ---------------------------------------------------------------


def test_conversation_keeps_the_turns_and_starts_fresh_when_full(llama3_tokenizer_dir: Path):
    tokenizer = load_tokenizer(llama3_tokenizer_dir)
    first = encode_chat(tokenizer, [{"role": "user", "content": "Hi"}])
    conversation = Conversation(tokenizer, max_seq_len=len(first) + 30, reserve=10)
    ids, notice = conversation.prompt_for("Hi")
    assert (ids, notice) == (first, None)
    conversation.add_turn("Hi", "Hello there.")
    ids, notice = conversation.prompt_for("Again")
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Again"},
    ]
    assert (ids, notice) == (encode_chat(tokenizer, turns), None)
    conversation.add_turn("Again", "Hello again, with a much longer answer this time round.")
    # Now the three turns leave less than `reserve` tokens: a fresh start, said out loud.
    ids, notice = conversation.prompt_for("Third")
    assert ids == encode_chat(tokenizer, [{"role": "user", "content": "Third"}])
    assert notice is not None and "fresh conversation" in notice
    assert conversation.turns == 0
    with pytest.raises(ContextError, match="--max-seq-len"):
        conversation.prompt_for("word " * 100)


def test_system_prompt_survives_a_reset(llama3_tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(llama3_tokenizer_dir)
    conversation = Conversation(tokenizer, 4096, 64, system_prompt="Be brief.")
    conversation.add_turn("Hi", "Hello.")
    conversation.reset()
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}]
    assert conversation.prompt_for("Q")[0] == encode_chat(tokenizer, expected)


# --- without a terminal: the prompt comes from stdin ---------------------------------------------


def test_prompt_from_stdin_equals_the_prompt_option(tiny_llama: Path) -> None:
    args = ["--model", str(tiny_llama), "--temperature", "0", "-n", "6", "--ignore-eos"]
    runner = CliRunner()
    piped = runner.invoke(main, args, input=QUESTION + "\n", catch_exceptions=False)
    given = runner.invoke(main, [*args, "--prompt", QUESTION], catch_exceptions=False)
    assert piped.exit_code == 0, piped.stderr
    assert piped.stdout == given.stdout
    assert piped.stdout.strip()


def test_no_prompt_and_empty_stdin_says_how_to_give_one(tiny_llama: Path) -> None:
    result = CliRunner().invoke(main, ["--model", str(tiny_llama)], input="")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "no prompt" in result.stderr and "--prompt" in result.stderr


# --- on a terminal: tmux -------------------------------------------------------------------------


class Tmux:
    """One tmux server of our own (its own socket), one window running `command`."""

    def __init__(self, command: str, width: int = 200) -> None:
        self.socket = f"cake-test-{uuid.uuid4().hex[:8]}"
        self.run("new-session", "-d", "-x", str(width), "-y", "50", command)

    def run(self, *args: str) -> str:
        out = subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True
        )
        return out.stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "0", *keys)

    def type(self, text: str) -> None:
        self.run("send-keys", "-t", "0", "-l", text)  # -l: literally, no key names

    def screen(self) -> str:
        # -J joins wrapped lines; -S -: the scrollback too.
        return self.run("capture-pane", "-p", "-J", "-S", "-", "-t", "0")

    def wait_for(self, found: Callable[[str], bool], what: str, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if found(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the terminal shows:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


@pytest.fixture
def tmux() -> Iterator[Callable[[str], Tmux]]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed: run scripts/setup.sh (apt-get install tmux)")
    sessions: list[Tmux] = []

    def start(command: str) -> Tmux:
        sessions.append(Tmux(command))
        return sessions[-1]

    yield start
    for session in sessions:
        session.close()


def answers(screen: str) -> list[tuple[str, str, int, str]]:
    """(question, answer, tokens, 'N tok/s' or 'stopped') for each finished turn on screen."""
    marker = re.escape(MARKER)
    pattern = re.compile(
        rf"^{marker}([^\n]*)\n((?:(?!\n{marker}).)*?)\n\[(\d+) tokens, ([^\]]+)\]$",
        re.MULTILINE | re.DOTALL,
    )
    return [(m[1], m[2].strip(), int(m[3]), m[4]) for m in pattern.finditer(screen)]


def after(screen: str, text: str) -> str:
    """What the terminal shows after the last `text`."""
    return screen.rpartition(text)[2]


GREEDY_SCRIPT = """
import asyncio, json, sys
from cake.model.tokenizer import encode_chat
from cake.master import Master, MasterSettings
from cake.decoding.sampling import SamplingParams

async def main(folder, conversations):
    master = await Master.open(MasterSettings(folder, device="cpu", dtype="f32"))
    try:
        texts = []
        for messages, limit in conversations:
            ids = encode_chat(master.tokenizer, messages)
            tokens = [t async for t in master.generate(ids, SamplingParams(temperature=0), limit)]
            texts.append(master.tokenizer.decode(tokens, skip_special_tokens=True))
        print(json.dumps(texts))
    finally:
        await master.close()

asyncio.run(main(*json.load(sys.stdin)))
"""


def greedy_answers(folder: Path, conversations: list[tuple[list[dict], int]]) -> list[str]:
    """Greedy generation after each conversation (at most its number of tokens), through the
    Master in a process of its own that, like cake-cli, lets idle OpenMP threads sleep (in
    this test's process, spinning threads would fight the chat's process for the cores)."""
    result = subprocess.run(
        [sys.executable, "-c", GREEDY_SCRIPT],
        input=json.dumps([str(folder), conversations]),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_chat_on_a_terminal(tmux: Callable[[str], Tmux], smollm2_dir: Path) -> None:
    """Two turns where the second answer is the greedy answer to the whole conversation (and
    not to its question alone), Ctrl-C stopping a long answer, then Ctrl-D leaving."""
    n = 64  # the story takes longer than that, so Ctrl-C stops it on the way
    command = (
        f"cd {REPO} && PYTHONPATH={REPO} {sys.executable} -m cake.cli --model {smollm2_dir} "
        f"--temperature 0 -n {n} --device cpu; echo cake-exit=$?; sleep 600"
    )
    term = tmux(command)
    term.wait_for(lambda s: s.rstrip().endswith(MARKER.rstrip()), "the prompt marker")
    first, second = "What is the capital of France?", "And of Italy?"
    term.type(first)
    term.keys("Enter")
    term.wait_for(lambda s: len(answers(s)) == 1, "the first answer")
    term.type(second)
    term.keys("Enter")
    screen = term.wait_for(lambda s: len(answers(s)) == 2, "the second answer")
    (q1, a1, _, _), (q2, a2, _, _) = answers(screen)
    assert (q1, q2) == (first, second)
    conversation = [{"role": "user", "content": first}, {"role": "assistant", "content": a1}]
    conversation.append({"role": "user", "content": second})
    alone = [{"role": "user", "content": second}]
    # Asked alone, the question gets another answer (its first tokens already differ).
    expected, alone_text = greedy_answers(smollm2_dir, [(conversation, n), (alone, 12)])
    assert a2 == expected.strip()
    assert "Rome" in a2  # what a person would check: the question only makes sense after the first
    assert not expected.startswith(alone_text) and not alone_text.startswith(expected), (
        "the test cannot tell whether the first turn was in the context"
    )

    # /reset forgets; Ctrl-C stops an answer and the chat goes on; Ctrl-D leaves.
    term.type("/reset")
    term.keys("Enter")
    term.wait_for(lambda s: "(new conversation)" in s, "the reset")
    story = "Write a very long story about a dragon."
    term.type(story)
    term.keys("Enter")
    term.wait_for(lambda s: after(s, story).strip() != "", "the story to start")
    term.keys("C-c")
    screen = term.wait_for(lambda s: len(answers(s)) == 3, "the stopped answer")
    assert answers(screen)[2][3] == "stopped"
    assert answers(screen)[2][2] < n
    term.wait_for(lambda s: s.rstrip().endswith(MARKER.rstrip()), "the marker after the stop")
    term.keys("C-d")
    screen = term.wait_for(lambda s: "cake-exit=" in s, "the chat to end")
    assert "cake-exit=0" in screen
    assert "Traceback" not in screen


@pytest.mark.slow  # a real process on a terminal (tmux)
def test_chat_needs_the_chat_template(tiny_llama: Path, tmux: Callable[[str], Tmux]) -> None:
    """--raw in a chat is refused with the way out, before the model loads."""
    env = f"PYTHONPATH={REPO} "
    command = (
        f"cd {REPO} && {env}{sys.executable} -m cake.cli --model {tiny_llama} --raw; "
        "echo cake-exit=$?; sleep 600"
    )
    term = tmux(command)
    screen = term.wait_for(lambda s: "cake-exit=" in s, "the error")
    assert "--raw" in screen and "--prompt" in screen and "cake-exit=1" in screen
