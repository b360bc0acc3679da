"""What `--dtype auto` and `--device auto` pick, and the weight layout, with mocked hardware."""

from __future__ import annotations

import pytest
import torch

from cake.host import devices
from cake.host.devices import resolve_device, resolve_dtype, weight_layout_in_out

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> dict[int, tuple[int, int]]:
    """cuda:0 a Turing card (7.5), cuda:1 an Ampere one (8.6); is_bf16_supported must not be
    asked (it answers for the current device, emulation included)."""
    capabilities = {0: (7, 5), 1: (8, 6)}

    def capability(device: torch.device | int | None = None) -> tuple[int, int]:
        index = device.index if isinstance(device, torch.device) else device
        assert index is not None, "asked without naming the device"
        return capabilities[index]

    def forbidden(*args: object, **kwargs: object) -> bool:
        raise AssertionError("is_bf16_supported() answers for the current device, emulated too")

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", forbidden)
    return capabilities


def test_auto_dtype_asks_the_chosen_gpu(two_gpus: dict) -> None:
    assert resolve_dtype("auto", CUDA0) == torch.float16  # Turing: bf16 only emulated
    assert resolve_dtype("auto", CUDA1) == torch.bfloat16


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((6, 1), torch.float16),  # Pascal
        ((7, 0), torch.float16),  # Volta
        ((7, 5), torch.float16),  # Turing
        ((8, 0), torch.bfloat16),  # Ampere A100
        ((8, 9), torch.bfloat16),  # Ada
        ((9, 0), torch.bfloat16),  # Hopper
    ],
)
def test_auto_dtype_per_generation(
    two_gpus: dict, capability: tuple[int, int], expected: torch.dtype
) -> None:
    two_gpus[0] = capability
    assert resolve_dtype("auto", CUDA0) == expected


def test_explicit_dtype_is_kept(two_gpus: dict) -> None:
    assert resolve_dtype("bf16", CUDA0) == torch.bfloat16
    assert resolve_dtype("f32", CUDA1) == torch.float32
    with pytest.raises(ValueError, match="--dtype 'f8'"):
        resolve_dtype("f8", CUDA0)


def test_auto_dtype_on_cpu_and_mps() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16


@pytest.mark.parametrize(
    ("version", "supported"),
    [
        ("2.5.1", False),
        ("2.6.0+cpu", False),
        ("2.7.0", True),
        ("2.7.0a0+git", True),
        ("2.13.0", True),
    ],
)
def test_mps_torch_versions(version: str, supported: bool) -> None:
    assert devices.mps_supported(version) is supported


def _fake_mps(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch, "__version__", version)


def test_mps_refused_on_old_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_mps(monkeypatch, "2.6.0")
    with pytest.raises(ValueError, match=r"torch >= 2\.7.*2\.6\.0.*--device cpu"):
        resolve_device("mps")


def test_auto_device_skips_mps_on_old_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_mps(monkeypatch, "2.6.0")
    assert resolve_device("auto") == torch.device("cpu")
    assert "needs torch >= 2.7" in caplog.text
    _fake_mps(monkeypatch, "2.7.1")
    assert resolve_device("auto") == torch.device("mps")


def test_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.delenv(devices.LAYOUT_ENV, raising=False)
    assert weight_layout_in_out(cpu, torch.float32, 3072, 576)  # out >= in: (in, out)
    assert not weight_layout_in_out(cpu, torch.float32, 576, 1536)  # narrow output: as stored
    assert not weight_layout_in_out(cpu, torch.bfloat16, 3072, 576)  # bf16 kernels: (out, in)
    assert not weight_layout_in_out(CUDA0, torch.float32, 3072, 576)  # GPUs: (out, in)
    monkeypatch.setenv(devices.LAYOUT_ENV, "out_in")
    assert not weight_layout_in_out(cpu, torch.float32, 3072, 576)
    monkeypatch.setenv(devices.LAYOUT_ENV, "in_out")
    assert weight_layout_in_out(cpu, torch.float32, 576, 1536)
    monkeypatch.setenv(devices.LAYOUT_ENV, "sideways")
    with pytest.raises(ValueError, match="CAKE_WEIGHT_LAYOUT"):
        weight_layout_in_out(cpu, torch.float32, 576, 1536)
