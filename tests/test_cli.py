"""`cake-cli` in master mode: options, errors, and what goes to stdout versus stderr."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cluster import workers_in_thread

from cake.cli import main

STATS_LINE = re.compile(
    r"^prompt tokens: (\d+), new tokens: (\d+), prefill: [\d.]+ tok/s, decode: [\d.]+ tok/s"
)
QUESTION = "What is the capital of France?"
# Token counts of QUESTION, worked out in test_chat.py from the Llama 3 vocabulary.
CHAT_PROMPT_TOKENS = 17
CHAT_WITH_SYSTEM_PROMPT_TOKENS = 28
RAW_PROMPT_TOKENS = 8  # <|begin_of_text|> + 7 text tokens


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def stats_of(result: Result) -> tuple[int, int]:
    """(prompt tokens, new tokens) from the stats line, which must be the last line on stderr."""
    last = result.stderr.rstrip("\n").splitlines()[-1]
    match = STATS_LINE.match(last)
    assert match, f"stderr does not end with the stats line: {result.stderr!r}"
    return int(match[1]), int(match[2])


def assert_fails(result: Result, *needles: str, exit_code: int | None = None) -> None:
    assert result.exit_code != 0, result.stdout
    if exit_code is not None:
        assert result.exit_code == exit_code, result.stderr
    # Not even an empty line: scripts read stdout as the answer (cake/cli.py `_run_master`
    # must not write `finish() + "\n"` when generation failed before any token).
    assert result.stdout == "", f"an error printed {result.stdout!r} to stdout"
    for needle in needles:
        assert needle in result.stderr, f"{needle!r} not in {result.stderr!r}"


def master_greedy_text(folder: Path, prompt: str, n: int, ignore_eos: bool = False) -> str:
    """What a greedy run should print, computed through the Master (not the CLI)."""
    from cake.decoding.sampling import SamplingParams
    from cake.master import Master, MasterSettings

    async def run() -> str:
        master = await Master.open(MasterSettings(folder, device="cpu", dtype="f32"))
        try:
            ids = master.encode(prompt)
            params = SamplingParams(temperature=0.0)
            tokens = [t async for t in master.generate(ids, params, n, ignore_eos)]
            return master.tokenizer.decode(tokens, skip_special_tokens=True)
        finally:
            await master.close()

    return asyncio.run(run())


# --- options ---------------------------------------------------------------------------------


def test_help_lists_the_options() -> None:
    result = run_cli("--help")
    assert result.exit_code == 0
    for option in (
        "--model",
        "--mode",
        "--topology",
        "--prompt",
        "--system-prompt",
        "--raw",
        "--sample-len",
        "--temperature",
        "--top-k",
        "--top-p",
        "--repeat-penalty",
        "--repeat-last-n",
        "--seed",
        "--ignore-eos",
        "--dtype",
        "--device",
        "--max-seq-len",
    ):
        assert option in result.stdout, option


def test_cli_module_imports_no_torch() -> None:
    code = "import sys, cake.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- errors ----------------------------------------------------------------------------------


def test_missing_model_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    assert_fails(run_cli("--model", str(missing)), str(missing), "no such model", exit_code=1)


def test_folder_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_fails(run_cli("--model", str(tmp_path)), "config.json", exit_code=1)


def test_non_llama_config(tmp_path: Path) -> None:
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_fails(run_cli("--model", str(tmp_path)), "gpt2", "Llama", exit_code=1)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--temperature", "-1"),
        ("--dtype", "f8"),
        ("--sample-len", "0"),
        ("--top-p", "0"),
        ("--top-k", "0"),
        ("--mode", "server"),
    ],
)
def test_bad_option_values(tiny_llama: Path, option: str, value: str) -> None:
    result = run_cli("--model", str(tiny_llama), option, value)
    assert_fails(result, option, value, exit_code=2)


def test_unknown_device(tiny_llama: Path) -> None:
    assert_fails(run_cli("--model", str(tiny_llama), "--device", "tpu"), "tpu", exit_code=1)


def test_prompt_longer_than_the_context(tiny_llama: Path) -> None:
    result = run_cli("--model", str(tiny_llama), "--prompt", QUESTION, "--max-seq-len", "8")
    assert_fails(result, f"{CHAT_PROMPT_TOKENS} tokens", "8", "--max-seq-len", exit_code=1)


def test_raw_with_system_prompt(tiny_llama: Path) -> None:
    result = run_cli("--model", str(tiny_llama), "--raw", "--system-prompt", "Be brief.")
    assert_fails(result, "--system-prompt", exit_code=1)


# --- output ----------------------------------------------------------------------------------


def test_stdout_is_only_the_generated_text(tiny_llama: Path) -> None:
    expected = master_greedy_text(tiny_llama, QUESTION, 12, ignore_eos=True)
    result = run_cli(
        "--model", str(tiny_llama), "--prompt", QUESTION,
        "--temperature", "0", "-n", "12", "--ignore-eos", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert stats_of(result) == (CHAT_PROMPT_TOKENS, 12)


def test_seed_reproducibility(tiny_llama: Path) -> None:
    def sample(seed: str) -> str:
        result = run_cli(
            "--model", str(tiny_llama), "--prompt", "Hi", "--temperature", "1.0",
            "--seed", seed, "-n", "10", "--ignore-eos", "--device", "cpu",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert stats_of(result)[1] == 10
        return result.stdout

    first = sample("7")
    assert sample("7") == first
    assert sample("8") != first


def test_raw_prompt_has_no_template(tiny_llama: Path) -> None:
    base = ["--model", str(tiny_llama), "--prompt", QUESTION, "--temperature", "0", "-n", "2"]
    assert stats_of(run_cli(*base))[0] == CHAT_PROMPT_TOKENS
    assert stats_of(run_cli(*base, "--raw"))[0] == RAW_PROMPT_TOKENS


def test_system_prompt_is_in_the_prompt(tiny_llama: Path) -> None:
    base = ["--model", str(tiny_llama), "--prompt", QUESTION, "--temperature", "0", "-n", "2"]
    result = run_cli(*base, "--system-prompt", "You are a helpful assistant.")
    assert result.exit_code == 0, result.stderr
    assert stats_of(result)[0] == CHAT_WITH_SYSTEM_PROMPT_TOKENS


STAGE_LINE = re.compile(
    r"stage (\S+): compute (\d+\.\d\d) ms/token, wire (\d+\.\d\d) ms/token, (\d+) round trips$"
)


@pytest.mark.slow
def test_stats_lines_give_every_stage_its_round_trips(tiny_llama: Path, tmp_path: Path) -> None:
    """--stats, in a real process with two workers and a block left on the master: one line
    per stage in block order, each worker with one round trip per step (the prefill and each
    decode step), the master's own stage with none; stdout unchanged, the summary last."""
    layers = {"w1": ["model.layers.0-1"], "w2": ["model.layers.3"]}  # block 2: the master's
    with workers_in_thread(tiny_llama, tmp_path, layers) as (topology, _):
        command = [sys.executable, "-m", "cake.cli", "--model", str(tiny_llama)]
        command += ["--topology", str(topology), "--device", "cpu", "--temperature", "0"]
        command += ["--prompt", QUESTION, "-n", "5", "--ignore-eos"]
        plain = subprocess.run(command, capture_output=True, text=True, timeout=300)
        stats = subprocess.run([*command, "--stats"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert stats.returncode == 0, stats.stderr
    assert stats.stdout == plain.stdout
    assert "stage" not in plain.stderr
    lines = stats.stderr.rstrip("\n").splitlines()
    stage_lines = [match for line in lines if (match := STAGE_LINE.search(line))]
    assert [m[1] for m in stage_lines] == ["w1", "master", "w2"]
    round_trips = {m[1]: int(m[4]) for m in stage_lines}
    assert round_trips == {"w1": 5, "master": 0, "w2": 5}  # prefill + 4 decode steps
    assert sum(float(m[2]) + float(m[3]) for m in stage_lines) > 0
    assert STATS_LINE.match(lines[-1])  # the summary stays last
    assert lines.index(next(line for line in lines if "stage w1:" in line)) < len(lines) - 1


@pytest.mark.slow
def test_real_process_answers_paris(smollm2_dir: Path) -> None:
    """One real `python -m cake.cli` process on SmolLM2: the answer on stdout, nothing else."""
    expected = master_greedy_text(smollm2_dir, QUESTION, 32)
    assert "Paris" in expected
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "cake.cli", "--model", str(smollm2_dir)]
    command += ["--prompt", QUESTION, "--temperature", "0", "-n", "32", "--device", "cpu"]
    process = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout == expected + "\n"
    assert "Paris" in process.stdout
    last = process.stderr.rstrip("\n").splitlines()[-1]
    match = STATS_LINE.match(last)
    assert match, process.stderr
    assert 0 < int(match[2]) < 32  # it stopped on its own end-of-turn token


def test_kv_memory_too_small_is_one_clear_error_and_a_size_that_fits_works(
    tiny_llama: Path,
) -> None:
    """--kv-memory below one session at the full context (4 blocks x 512 positions x 256
    bytes = 512 KiB here): one line that names the option, the size and the fix, exit 1,
    nothing on stdout. 1 MiB holds it: the answer, its 4 tokens."""
    base = ["--model", str(tiny_llama), "--prompt", QUESTION, "--temperature", "0", "-n", "4"]
    base += ["--ignore-eos", "--device", "cpu", "--max-seq-len", "512"]
    result = run_cli(*base, "--kv-memory", "64K")
    assert_fails(result, exit_code=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: --kv-memory 64.0 KiB cannot hold one session of 512 positions for blocks 0-3 "
        "of the master (that needs 512.0 KiB): raise --kv-memory or lower --max-seq-len"
    ], result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli(*base, "--kv-memory", "1MiB")
    assert result.exit_code == 0, result.stderr
    assert stats_of(result) == (CHAT_PROMPT_TOKENS, 4)
    assert result.stdout.strip() and result.stdout.endswith("\n")  # the answer
