"""The chat page of `cake-cli --api`, in a real browser: Debian's Chromium driven by Playwright.

One server for the module, as users run it: SmolLM2 split between a worker process (blocks
0-14) and `python -m cake.cli --api 127.0.0.1:0 --api-key ...` (blocks 15-29 and the head).
Run this file alone with `.venv/bin/python -m pytest tests/test_webchat.py -q`.
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
from api_server import ApiProcess

from cake.cluster.local_cluster import start_local_cluster
from cake.faces.webchat import KEY_TAG, chat_page, static_file

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


@dataclass
class Server:
    url: str
    worker_port: int
    lines: list[str]

    def call(self, path: str, body: dict | None = None, key: str | None = API_KEY) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        if key is not None:
            request.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())


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
    page.click("#new-chat")
    assert page.locator(".message").count() == 0
    assert page.is_visible("#empty-hint")
    page.close()
    assert problems.seen == []
