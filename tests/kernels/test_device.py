"""Device peaks: the arithmetic from device attributes (a faked attribute source; no GPU
and no cuda-python needed), the name-table fallback and its precedence rules."""

from __future__ import annotations

import pytest
import torch

from mugv_kernels import device
from mugv_kernels.device import DevicePeaks, peaks_by_name, peaks_from_attributes


def _source(**values):
    return lambda key: values.get(key)


# What an A100-SXM4-80GB reports (1593 MHz memory, 5120-bit bus, 108 SMs, 1410 MHz, sm_80).
A100 = dict(memory_clock_khz=1_593_000, bus_width_bits=5120, sm_count=108, clock_khz=1_410_000, cc_major=8, cc_minor=0)


def test_bandwidth_and_tensor_peak_from_attributes():
    p = peaks_from_attributes("NVIDIA A100-SXM4-80GB", _source(**A100))
    assert p.source == "device"
    assert p.hbm_bytes_per_s == pytest.approx(2 * 1.593e9 * 5120 / 8)  # 2.039 TB/s, the datasheet's
    assert p.bf16_flops == pytest.approx(108 * 1.41e9 * 2048)  # 312 TFLOP/s, the datasheet's
    assert p.hbm_bytes_per_s == pytest.approx(peaks_by_name("A100-SXM4-80GB").hbm_bytes_per_s, rel=0.01)
    assert p.bf16_flops == pytest.approx(peaks_by_name("A100-SXM4-80GB").bf16_flops, rel=0.01)


def test_unknown_device_with_attributes_and_unknown_arch():
    sm100 = dict(A100, cc_major=10, sm_count=148, clock_khz=1_000_000)
    p = peaks_from_attributes("Some Future GPU", _source(**sm100))
    assert p.source == "device" and p.bf16_flops == pytest.approx(148 * 1e9 * 8192)
    # an architecture without a known per-SM rate and no table entry: no tensor peak, so no peaks
    assert peaks_from_attributes("Some Other GPU", _source(**dict(A100, cc_major=7))) is None


def test_table_wins_for_hopper_tensor_peak_but_bandwidth_comes_from_device():
    h100 = dict(memory_clock_khz=2_619_000, bus_width_bits=5120, sm_count=132, clock_khz=1_980_000, cc_major=9, cc_minor=0)
    p = peaks_from_attributes("NVIDIA H100 80GB HBM3", _source(**h100))
    assert p.source == "device+table"
    assert p.bf16_flops == 989e12  # not 132 x 1980 MHz x 4096 = 1070 TFLOP/s
    assert p.hbm_bytes_per_s == pytest.approx(2 * 2.619e9 * 640)


def test_fallbacks():
    assert peaks_from_attributes("NVIDIA H200", _source()) == peaks_by_name("NVIDIA H200")
    assert peaks_from_attributes("mystery", _source()) is None
    only_bw = peaks_from_attributes("NVIDIA L40S", _source(memory_clock_khz=9_001_000, bus_width_bits=384))
    assert only_bw.source == "device+table" and only_bw.bf16_flops == peaks_by_name("L40S").bf16_flops
    assert peaks_from_attributes("mystery", _source(memory_clock_khz=1, bus_width_bits=8)) is None
    assert peaks_by_name("NVIDIA H100 PCIe").name == "H100 PCIe"  # the specific entry before "H100"
    assert peaks_by_name("NVIDIA B200").bf16_flops == device.GPU_PEAKS["b200"].bf16_flops


def test_device_peaks_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.device_peaks() is None


def test_device_peaks_with_a_faked_device(monkeypatch):
    """The path a GPU takes, with torch's device queries and the cuda-python source faked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(device, "_cuda_bindings_source", lambda index: _source(**A100))
    assert device.device_peaks().source == "device"
    assert device.device_peaks(torch.device("cuda", 0)).source == "device"
    monkeypatch.setattr(device, "_cuda_bindings_source", lambda index: None)  # cuda-python absent
    assert device.device_peaks(0) == peaks_by_name("A100-SXM4-80GB")


def test_cuda_bindings_source_is_optional():
    try:
        import cuda.bindings  # noqa: F401
    except ImportError:
        assert device._cuda_bindings_source(0) is None
    else:
        assert callable(device._cuda_bindings_source(0))
    assert isinstance(peaks_by_name("H100"), DevicePeaks)
