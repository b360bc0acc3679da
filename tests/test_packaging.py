"""The distribution `cake-llm`: `python -m build` makes a wheel that installs into a fresh
virtual environment with the chat page inside, and whose commands run.

Fast and offline: the build uses this environment's setuptools (--no-isolation), and the fresh
environment gets the wheel alone (--no-deps) and sees this one's packages (torch, fastapi, ...)
through a .pth file, which adds the folder to sys.path without running the .pth files in it
(so this checkout's editable install cannot shadow the wheel).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STATIC_FILES = {"chat.html", "chat.js", "chat.css", "markdown.js"}


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_wheel_installs_with_the_chat_page(tmp_path: Path) -> None:
    # A copy of what the wheel is built from, so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copytree(REPO / "cake", source / "cake", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    run(sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", tmp_path / "dist",
        source, cwd=tmp_path)  # fmt: skip
    wheels = list((tmp_path / "dist").glob("*.whl"))
    assert [w.name for w in wheels] == ["cake_llm-0.1.0-py3-none-any.whl"]

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        "--disable-pip-version-check", "-q", wheels[0], cwd=tmp_path)  # fmt: skip
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                  cwd=tmp_path).strip()  # fmt: skip
    (Path(purelib) / "cake_test_dependencies.pth").write_text(
        sysconfig.get_path("purelib") + "\n", encoding="utf-8"
    )

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    check = (
        "import cake, importlib.metadata as m, importlib.resources as r; "
        "print(cake.__file__); print(m.version('cake-llm')); "
        "static = r.files('cake.faces').joinpath('static'); "
        "print(' '.join(sorted(p.name for p in static.iterdir()))); "
        "from cake.faces.webchat import chat_page; "
        "print('cake-api-key-required' in chat_page(False))"
    )
    where, version, files, page_ok = run(python, "-c", check, cwd=tmp_path, env=env).split("\n")[:4]
    assert Path(where).is_relative_to(venv), f"cake was imported from {where}, not the wheel"
    assert version == "0.1.0"
    assert set(files.split()) >= STATIC_FILES
    assert page_ok == "True"

    for command in ("cake-cli", "cake-split-model"):
        help_text = run(venv / "bin" / command, "--help", cwd=tmp_path, env=env)
        assert "--model" in help_text or "--model-path" in help_text, command
