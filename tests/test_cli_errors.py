"""Errors, not tracebacks: every failure a user can cause ends cake-cli with one `error:` line
on stderr, nothing on stdout and exit status 1; a reader that closes stdout early ends it
quietly.

The CLI runs through its click entry point in this process (helpers.run_cli: only a SystemExit
may end it, any other exception fails the test with its traceback), except where the process
itself is the point: stdout a full disk or a pipe closed early, a disk full under split_main's
own open() (those run as real processes, and are `slow`)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from helpers import run_cli

CLI = [sys.executable, "-m", "cake.cli"]
SPLIT = [sys.executable, "-c", "from cake.cli import split_main; split_main()"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV, **kwargs)


def assert_one_error_line(result: Any, *needles: str) -> str:
    """`result`: a finished subprocess, or helpers.run_cli's result."""
    assert getattr(result, "returncode", getattr(result, "exit_code", None)) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip("\n").endswith(errors[0]), "the error is the last line"
    assert result.stdout == ""
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def model_copy(tiny_llama: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model that a test may break."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def test_truncated_safetensors(model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    result = run_cli("--model", str(model_copy), "-n", "2")
    assert_one_error_line(result, str(weights), "truncated or corrupt")


def test_corrupt_safetensors_header(model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes()[:4096])
    data[8:40] = b"\xff" * 32  # the JSON header, now invalid UTF-8
    weights.write_bytes(bytes(data))
    result = run_cli("--model", str(model_copy), "-n", "2")
    assert_one_error_line(result, str(weights), "truncated or corrupt")


CONFIG_CHANGES = {
    "not-json": (lambda config: "{not json", "not valid JSON"),
    "list": (lambda config: json.dumps([config]), "not a JSON object"),
    "null": (lambda config: json.dumps({**config, "hidden_size": None}), "hidden_size"),
    "negative": (lambda config: json.dumps({**config, "num_hidden_layers": -1}), "positive"),
    "fraction": (lambda config: json.dumps({**config, "hidden_size": 64.5}), "whole number"),
    "heads": (lambda config: json.dumps({**config, "num_key_value_heads": 3}), "multiple"),
    "rope": (lambda config: json.dumps({**config, "rope_parameters": "x"}), "invalid config"),
    "eos": (lambda config: json.dumps({**config, "eos_token_id": "x"}), "invalid config"),
}


@pytest.mark.parametrize("name", ["not-json", "null"])
def test_invalid_config_json(model_copy: Path, name: str) -> None:
    change, needle = CONFIG_CHANGES[name]
    path = model_copy / "config.json"
    path.write_text(change(json.loads(path.read_text())))
    result = run_cli("--model", str(model_copy), "-n", "2")
    assert_one_error_line(result, "config.json", needle)


@pytest.mark.parametrize("name", CONFIG_CHANGES)
def test_every_invalid_config_is_a_model_folder_error(model_copy: Path, name: str) -> None:
    """The same path as above in-process, for every kind of bad value (the CLI prints a
    ModelFolderError as one line, as the two cases above show)."""
    from cake.errors import ModelFolderError
    from cake.model.config import LlamaConfig

    change, needle = CONFIG_CHANGES[name]
    path = model_copy / "config.json"
    path.write_text(change(json.loads(path.read_text())))
    with pytest.raises(ModelFolderError, match=needle):
        LlamaConfig.from_folder(model_copy)


def test_model_path_neither_folder_nor_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    result = run_cli("--model", str(path))
    assert_one_error_line(result, str(path), "not a folder and not a .gguf file")


@pytest.mark.slow  # a real process whose stdout is /dev/full
def test_full_disk_on_stdout(tiny_llama: Path) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*CLI, "--model", str(tiny_llama), "--prompt", "hi", "-n", "4", "--ignore-eos",
             "--device", "cpu"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=300, env=ENV,
        )  # fmt: skip
    result.stdout = ""
    assert_one_error_line(result, "stdout", "No space left on device")


FULL_DISK = textwrap.dedent(
    """
    # Every file opened for writing under OUTPUT fails with ENOSPC after its first 4 KiB.
    import builtins, errno, io, sys

    OUTPUT, real_open = sys.argv.pop(1), builtins.open

    class FullDisk:
        def __init__(self, file):
            self.file, self.written = file, 0
        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(data)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.file.close()
        def __getattr__(self, name):
            return getattr(self.file, name)

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        writing = any(flag in mode for flag in "wax+")
        return FullDisk(opened) if writing and str(file).startswith(OUTPUT) else opened

    builtins.open = io.open = open_on_a_full_disk
    from cake.cli import split_main
    split_main()
    """
)


@pytest.mark.slow  # a real process, its open() replaced
def test_full_disk_while_splitting(tiny_llama: Path, tmp_path: Path) -> None:
    topology = tmp_path / "topology.yml"
    topology.write_text("w1:\n  host: '127.0.0.1:1'\n  layers: ['model.layers.0-1']\n")
    output = tmp_path / "out"
    command = [sys.executable, "-c", FULL_DISK, str(output)]
    command += ["--model-path", str(tiny_llama), "--topology", str(topology)]
    result = run([*command, "--output", str(output)])
    assert_one_error_line(result, "No space left on device", f"nothing was written to {output}")
    assert not output.exists() or list(output.iterdir()) == []  # no half-written bundle


def test_worker_port_in_use_fails_before_loading(tiny_llama: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        topology = tmp_path / "topology.yml"
        topology.write_text(f"w1:\n  host: '127.0.0.1:{port}'\n  layers: ['model.layers.0-1']\n")
        result = run_cli(
            "--model", str(tiny_llama), "--mode", "worker", "--name", "w1",
            "--topology", str(topology),
        )  # fmt: skip
    assert_one_error_line(result, f"127.0.0.1:{port}", "Address already in use")
    assert "loading blocks" not in result.stderr  # found before the weights, not after


@pytest.mark.slow  # a real process, its stdout a pipe closed early
def test_a_reader_that_closes_stdout_early_ends_it_quietly(tiny_llama: Path) -> None:
    """`cake-cli … | head -c 1`: no traceback, no error line, no complaint at exit."""
    process = subprocess.Popen(
        [*CLI, "--model", str(tiny_llama), "--raw", "--prompt", "a", "-n", "200",
         "--ignore-eos", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.read(1)  # the reader takes what it wanted, and goes
    process.stdout.close()
    stderr = process.stderr.read()
    process.wait(timeout=300)
    assert first
    assert process.returncode == 141, stderr  # as a process killed by SIGPIPE reports
    assert "Traceback" not in stderr
    assert "error" not in stderr.lower()
    assert "Exception ignored" not in stderr
    assert "prompt tokens:" not in stderr  # it stopped there: no summary of a cut run
