"""The chat page of `cake-cli --api`, in a real browser: Debian's Chromium driven by Playwright.

The chat itself runs on one server for the module, as users run it: SmolLM2 split between a
worker process (blocks 0-14) and `python -m cake.cli --api 127.0.0.1:0 --api-key ...` (blocks
15-29 and the head). What the page shows when things go wrong (a refused key, an HTTP error,
a stream that fails or is cut) runs on the tiny model's API in this process, whose stage a test
can make fail. Run this file alone with `.venv/bin/python -m pytest tests/test_webchat.py -q`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from api_server import ApiProcess, FailingStage, api_in_thread
from api_server import Server as ThreadServer

from cake.cluster.local_cluster import start_local_cluster
from cake.errors import WorkerGone
from cake.faces.webchat import KEY_TAG, chat_page, static_file
from cake.model.tokenizer import encode_chat

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
API_KEY = "page-test-key"
TIMEOUT_MS = 180_000  # a shared CI machine can be slow; nothing here is timed
TINY_TIMEOUT_MS = 30_000  # the same, for the tiny model's answers


def call(url: str, path: str, body: dict | None = None, key: str | None = API_KEY) -> Any:
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@dataclass
class Server:
    url: str
    worker_port: int
    lines: list[str]

    def call(self, path: str, body: dict | None = None, key: str | None = API_KEY) -> Any:
        return call(self.url, path, body, key)


@pytest.fixture(scope="module")
def server(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    topology = tmp_path_factory.mktemp("webchat") / "topology.yml"
    workers = start_local_cluster(smollm2_dir, {"worker0": ["model.layers.0-14"]}, topology)
    command = [sys.executable, "-m", "cake.cli", "--model", str(smollm2_dir), "--device", "cpu"]
    # --ignore-eos: an answer runs to its max tokens, so there is always a long one to stop.
    command += ["--topology", str(topology), "--api", "127.0.0.1:0", "--api-key", API_KEY]
    command += ["--ignore-eos", "--max-seq-len", "2048"]
    process = ApiProcess(command, timeout=300)
    try:
        assert process.url, "the API server did not start:\n" + "".join(process.lines)
        yield Server(process.url, workers[0].port, process.lines)
    finally:
        process.stop()
        for worker in workers:
            worker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Debian's Chromium, never a downloaded one.
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class PageProblems:
    """Console errors and uncaught exceptions of a page, collected as they happen."""

    def __init__(self, page: Any) -> None:
        self.seen: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.seen.append(m.text))
        page.on("pageerror", lambda error: self.seen.append(f"uncaught: {error}"))


# --- without a browser -------------------------------------------------------------------------


def test_the_page_and_its_files_ship_in_the_package() -> None:
    page = chat_page(api_key_required=False)
    assert KEY_TAG in page
    assert 'content="true"' in chat_page(api_key_required=True)
    for src in re.findall(r'(?:src|href)="static/([\w.]+)"', page):
        assert static_file(src), src
    assert "http://" not in page and "https://" not in page  # nothing from the internet


@pytest.mark.slow
def test_status_names_workers_only_with_the_key(server: Server) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        server.call("/v1/cake/status", key=None)
    assert refused.value.code == 401
    assert "worker0" not in refused.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as wrong:
        server.call("/v1/cake/status", key="not-the-key")
    assert wrong.value.code == 401
    status = server.call("/v1/cake/status")
    assert status["context"] == 2048
    stages = {stage["blocks"]: stage for stage in status["stages"]}
    assert stages["0-14"]["worker"] == "worker0"
    assert stages["0-14"]["address"] == f"127.0.0.1:{server.worker_port}"
    assert stages["0-14"]["connected"] is True
    assert stages["15-29"]["connected"] is True and "worker" not in stages["15-29"]
    # The page itself and its files are public: they hold nothing.
    with urllib.request.urlopen(server.url + "/", timeout=30) as response:
        assert 'name="cake-api-key-required" content="true"' in response.read().decode()


# --- in the browser ----------------------------------------------------------------------------


@pytest.mark.slow
def test_markdown_is_rendered_and_never_injects_markup(server: Server, browser: Any) -> None:
    page = browser.new_page()
    problems = PageProblems(page)
    page.goto(server.url + "/")
    hostile = (
        "# Title\n<img src=x onerror=alert(1)> **bold** *it* `<b>code</b>`\n"
        "[ok](https://example.org) [bad](javascript:alert(1))\n"
        "```python\nprint('<script>alert(1)</script>')\n```\n- one\n- two\n1. first"
    )
    html = page.evaluate("(text) => window.cakeMarkdown.render(text)", hostile)
    assert "<img" not in html and "<script" not in html and "<b>" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<h1>Title</h1>" in html and "<strong>bold</strong>" in html and "<em>it</em>" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert '<a href="https://example.org"' in html and 'href="javascript' not in html
    assert '<pre><code class="language-python">print(&#39;&lt;script&gt;' in html
    assert "<ul><li>one</li><li>two</li></ul>" in html and "<ol><li>first</li></ol>" in html
    # While an answer streams, an unclosed fence is a code block to the end.
    assert page.evaluate("() => window.cakeMarkdown.render('```\\nx = 1')") == (
        "<pre><code>x = 1</code></pre>"
    )
    page.close()
    assert problems.seen == []


@pytest.mark.slow
def test_chat_in_the_browser(server: Server, browser: Any) -> None:
    """Ask for the key, send with Enter (Shift+Enter is a new line), watch the answer stream in,
    stop a long answer, start a new chat; no console errors on the way."""
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.set_default_timeout(TIMEOUT_MS)
    problems = PageProblems(page)
    page.goto(server.url + "/")

    # The key: asked for, kept in this tab's sessionStorage only.
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", API_KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#status .stage.up >> text=worker0")
    assert page.evaluate("() => sessionStorage.getItem('cake-api-key')") == API_KEY
    assert page.evaluate("() => localStorage.length") == 0
    strip = page.inner_text("#status")
    assert f"blocks 0-14: worker0 (127.0.0.1:{server.worker_port})" in strip
    assert "blocks 15-29: master" in strip and "2048 tokens of context" in strip

    page.click("#settings-toggle")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "16")

    # Record every length the answer goes through, to see it stream.
    page.evaluate("""() => {
        window.answerLengths = [];
        new MutationObserver(() => {
            const answers = document.querySelectorAll('.message.assistant .body');
            if (answers.length) window.answerLengths.push(answers[0].textContent.length);
        }).observe(document.getElementById('messages'),
                   {childList: true, subtree: true, characterData: true});
    }""")
    page.click("#input")
    page.keyboard.type("What is the capital")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("of France?")
    assert page.locator(".message").count() == 0  # Shift+Enter did not send
    page.keyboard.press("Enter")
    page.wait_for_selector(".message.assistant[data-done=finished]")
    question = "What is the capital\nof France?"
    assert page.inner_text(".message.user") == question
    lengths = [n for n in page.evaluate("() => window.answerLengths") if n]
    assert len(set(lengths)) >= 3, f"the answer did not stream: {lengths}"
    assert lengths == sorted(lengths)
    # What the page shows is what the API answers to the same request, unstreamed.
    reply = server.call(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 16},
    )
    expected = reply["choices"][0]["message"]["content"]
    assert "Paris" in expected
    shown = page.inner_text(".message.assistant .body")
    assert shown.split() == expected.split()
    assert re.search(r"last answer: 16 tokens, [\d.]+ tok/s", page.inner_text("#status-speed"))

    # A long answer, stopped: the stream ends, the server stops generating.
    page.fill("#max-tokens", "1500")
    page.fill("#input", "Tell me a very long story.")
    page.press("#input", "Enter")
    page.wait_for_selector("#stop:visible")
    page.wait_for_function(
        "() => document.querySelectorAll('.message.assistant .body')[1].textContent.length > 20"
    )
    page.click("#stop")
    page.wait_for_selector(".message.assistant[data-done=stopped]")
    assert page.is_visible("#send") and not page.is_visible("#stop")
    page.wait_for_function(
        """async () => {
            const key = sessionStorage.getItem('cake-api-key');
            const r = await fetch('v1/cake/status', {headers: {Authorization: `Bearer ${key}`}});
            return (await r.json()).running === 0;
        }""",
        polling=200,
    )
    stopped = page.inner_text(".message.assistant >> nth=1")
    assert "stopped" in stopped and len(stopped.split()) < 1500

    # The next question carries the conversation (stopped answer included); then New chat.
    page.fill("#max-tokens", "4")
    page.fill("#input", "Thanks!")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.press("#input", "Enter")
    roles = [m["role"] for m in sent.value.post_data_json["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    page.wait_for_function(
        "() => document.querySelectorAll('.message.assistant[data-done=finished]').length === 2"
    )
    # The earlier turns came from the server's prefix cache, and the status strip says so.
    cached = re.search(r"cached (\d+) tokens", page.inner_text("#status-speed"))
    assert cached and int(cached.group(1)) > 20, page.inner_text("#status-speed")
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert page.is_visible("#empty-hint")
    page.close()
    assert problems.seen == []


# --- what the page shows when something goes wrong ---------------------------------------------


@dataclass
class TinyServer:
    server: ThreadServer
    stage: FailingStage


@pytest.fixture(scope="module")
def failing(tiny_llama: Path) -> Iterator[TinyServer]:
    """The tiny model in this process, behind the key, its one stage wrapped so that a test
    can make it fail for good after some tokens (as a worker lost for good does)."""
    stages: list[FailingStage] = []

    def wrap(master: Any) -> None:
        stages.append(FailingStage(master.pipeline.stages[0]))
        master.pipeline.stages[0] = stages[0]

    with api_in_thread(tiny_llama, prepare=wrap, api_key=API_KEY) as server:
        yield TinyServer(server, stages[0])


def open_chat(browser: Any, url: str, key: str = API_KEY) -> tuple[Any, PageProblems]:
    """A page with `key` given in its key dialog (the right one: its settings open)."""
    page = browser.new_page()
    page.set_default_timeout(TINY_TIMEOUT_MS)
    problems = PageProblems(page)
    page.goto(url + "/")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", key)
    page.press("#key-input", "Enter")
    if key == API_KEY:
        page.wait_for_selector("#status .stage.up")
        page.click("#settings-toggle")
    return page, problems


def ask(page: Any, question: str) -> None:
    page.fill("#input", question)
    page.press("#input", "Enter")
    page.wait_for_selector(".message.assistant[data-done]")


def error_note(page: Any) -> str:
    return page.inner_text(".message.assistant .note.error")


def refused_resources(problems: PageProblems) -> list[str]:
    """Console errors other than the browser's own line for a refused request."""
    return [seen for seen in problems.seen if "Failed to load resource" not in seen]


@pytest.mark.slow
def test_a_wrong_key_is_refused_on_the_page(failing: TinyServer, browser: Any) -> None:
    """The status strip says the key was refused and the dialog asks again; a question sent
    with a wrong key shows the API's 401 message, and the key dialog comes back."""
    url = failing.server.url
    page, problems = open_chat(browser, url, key="not-the-key")
    page.wait_for_selector("#key-dialog[open] #key-error:visible")
    assert page.inner_text("#key-error") == "That key was refused."
    assert page.inner_text("#status-model") == "API key refused"

    page.fill("#key-input", API_KEY)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#status .stage.up")
    assert not page.is_visible("#key-dialog")

    page.evaluate("() => sessionStorage.setItem('cake-api-key', 'changed-since')")
    ask(page, "hi")
    assert page.get_attribute(".message.assistant", "data-done") == "error"
    assert error_note(page) == "error: incorrect API key"
    page.wait_for_selector("#key-dialog[open] #key-error:visible")
    assert page.input_value("#input") == "hi"  # the question is back, to send again
    page.close()
    assert refused_resources(problems) == []


@pytest.mark.slow
def test_an_http_error_shows_the_apis_message(failing: TinyServer, browser: Any) -> None:
    """A request the API answers 400 (more tokens than the context holds): the page shows the
    message of OpenAI's error body, word for word, and keeps the question."""
    page, problems = open_chat(browser, failing.server.url)
    page.fill("#max-tokens", "1000")
    question = "tell me a story"
    messages = [{"role": "user", "content": question}]
    with pytest.raises(urllib.error.HTTPError) as refused:
        call(failing.server.url, "/v1/chat/completions", {"messages": messages, "max_tokens": 1000})
    assert refused.value.code == 400
    message = json.loads(refused.value.read())["error"]["message"]
    assert "context holds 256 tokens" in message

    ask(page, question)
    assert page.get_attribute(".message.assistant", "data-done") == "error"
    assert error_note(page) == f"error: {message}"
    assert page.input_value("#input") == question
    page.close()
    assert refused_resources(problems) == []


@pytest.mark.slow
def test_an_error_mid_stream_shows_after_the_partial_answer(
    failing: TinyServer, browser: Any
) -> None:
    """The stage fails for good after 6 forwards (the prompt's and 5 decode steps): the page
    keeps the 6 tokens' text that came, then shows the error the stream ended with."""
    server = failing.server
    page, problems = open_chat(browser, server.url)
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "50")
    question = "tell me a story"
    prompt_ids = encode_chat(server.master.tokenizer, [{"role": "user", "content": question}])
    partial = server.master.tokenizer.decode(server.greedy(prompt_ids, 6), skip_special_tokens=True)
    gone = "worker w2 (127.0.0.1:10128) did not come back within 0.5s (--retry-timeout)"
    failing.stage.arm(after=6, error=WorkerGone(gone))
    try:
        ask(page, question)
    finally:
        failing.stage.disarm()
    answer = ".message.assistant"
    assert page.get_attribute(answer, "data-done") == "error"
    rendered = page.evaluate("(text) => window.cakeMarkdown.render(text)", partial)
    assert partial.strip() and page.inner_html(f"{answer} .body") == rendered
    assert error_note(page) == f"error: {gone}"
    order = page.eval_on_selector_all(f"{answer} > *", "nodes => nodes.map(n => n.className)")
    assert order == ["body", "note error"]  # the error after the partial text
    page.close()
    assert problems.seen == []


@pytest.mark.slow
def test_a_stream_cut_without_its_end_is_an_error(failing: TinyServer, browser: Any) -> None:
    """A body that stops with neither [DONE] nor an error event (the server went down, a proxy
    cut it) is not a finished answer: the page says so after the text that came."""
    page, problems = open_chat(browser, failing.server.url)
    cut = "".join(
        f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': piece}}]})}\n\n"
        for piece in ("Half ", "an answer")
    )
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=cut),
    )
    ask(page, "hi")
    assert page.get_attribute(".message.assistant", "data-done") == "error"
    assert page.inner_text(".message.assistant .body") == "Half an answer"
    assert error_note(page) == "error: the connection closed before the answer was complete"
    page.close()
    assert problems.seen == []
