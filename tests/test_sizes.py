"""One size parser and formatter for every option (cake/host/sizes.py): K/M/G/T and KiB..TiB are
binary, kB/MB/GB/TB decimal, whichever option reads them."""

from __future__ import annotations

import pytest

from cake.host.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("2GiB", 2 * 2**30),
        ("2gib", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5G", int(1.5 * 2**30)),
        ("6g", 6 * 2**30),
        ("512M", 512 * 2**20),
        ("1T", 2**40),
        ("8GB", 8 * 10**9),
        ("800MB", 800 * 10**6),
        ("1.5kB", 1500),
        ("2 TB", 2 * 10**12),
        ("12K", 12 * 1024),
    ],
)
def test_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "lots", "2 GiBs", "-1G", "1PB", "0", "0.0G", "G"])
def test_bad_sizes_name_the_option(bad: str) -> None:
    with pytest.raises(ValueError, match=f"--max-memory {bad!r}"):
        parse_size(bad, "--max-memory")


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 2**20) == "3.0 MiB"
    assert format_size(5 * 2**40) == "5120.0 GiB"


def test_the_cli_options_agree(tiny_llama) -> None:
    """--kv-memory and --max-memory read '8GB' alike (they used to differ by 7%)."""
    import torch
    from click.testing import CliRunner

    from cake import cli
    from cake.engine.session_store import kv_budget

    seen = {}
    command = cli.main
    option = next(p for p in command.params if p.name == "max_memory")
    seen["max"] = option.callback(None, option, "8GB")
    seen["kv"] = kv_budget("8GB", torch.device("cpu"))
    assert seen["max"] == seen["kv"] == 8 * 10**9
    result = CliRunner().invoke(command, ["--mode", "worker", "--max-memory", "8Q"])
    assert result.exit_code == 2 and "--max-memory '8Q'" in result.output
