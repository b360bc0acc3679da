"""Take docs/chat.png: the chat page of `cake-cli --api` over the demo model split in two.

    .venv/bin/python scripts/chat_screenshot.py [--out docs/chat.png]

Starts two loopback workers (SmolLM2-135M-Instruct, blocks 0-14 and 15-29) and the API server,
asks the page a question in headless Chromium (Debian's, as the tests use), saves a screenshot,
and stops everything.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cake.cluster.local_cluster import start_workers  # noqa: E402
from cake.model.demo import demo_gguf  # noqa: E402
from cake.model.gguf import resolve_model_path  # noqa: E402

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
QUESTIONS = [
    "Write a Python function that returns the square of a number.",
    "Now explain it in one sentence.",
]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_api(folder: Path, topology: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "cake.cli", "--model", str(folder), "--device", "cpu"]
    command += ["--topology", str(topology), "--api", "127.0.0.1:0"]
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    found = threading.Event()
    url: list[str] = []

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            match = re.search(r"API on (http://\S+)", line)
            if match:
                url.append(match[1].rstrip(" ("))
                found.set()
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(300) or not url:
        process.kill()
        raise SystemExit("the API server did not start")
    return process, url[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "chat.png"))
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    folder = resolve_model_path(demo_gguf())
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "topology.yml"
        topology.write_text(
            f"worker0:\n  host: '127.0.0.1:{free_port()}'\n  layers: ['model.layers.0-14']\n"
            f"worker1:\n  host: '127.0.0.1:{free_port()}'\n  layers: ['model.layers.15-29']\n"
        )
        workers = start_workers(folder, topology, ["worker0", "worker1"])
        api = None
        try:
            api, url = start_api(folder, topology)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
                )
                page = browser.new_page(viewport={"width": 1000, "height": 720})
                page.set_default_timeout(300_000)
                page.goto(url + "/")
                page.wait_for_selector("#status .stage.up")
                page.click("#settings-toggle")
                page.fill("#temperature", "0")
                page.fill("#max-tokens", "160")
                page.click("#settings-toggle")
                for number, question in enumerate(QUESTIONS, start=1):
                    page.fill("#input", question)
                    page.press("#input", "Enter")
                    done = "document.querySelectorAll('.message[data-done]').length"
                    page.wait_for_function(f"() => {done} === {number}")
                time.sleep(0.5)
                page.screenshot(path=args.out)
                browser.close()
            print(f"wrote {args.out}", file=sys.stderr)
        finally:
            if api is not None:
                api.send_signal(signal.SIGINT)
                api.wait(30)
            for worker in workers:
                worker.stop()


if __name__ == "__main__":
    main()
