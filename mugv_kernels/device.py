"""Peak figures of the GPU at hand, read from the device itself (never hard-coded to one GPU).

Used by the benchmarks (fraction of HBM peak, of bf16 dense peak), the roofline model
(:mod:`mugv.perf`) and the trainer's MFU.

Where the figures come from, in order:

1. **The device** through ``cuda-python`` (``cuda.bindings.runtime``, optional; not a
   dependency): HBM bandwidth = memory clock x 2 (double data rate) x bus width / 8, and
   the dense bf16 tensor-core peak = SM count x SM clock x the per-SM rate of the
   architecture (:data:`TENSOR_FLOPS_PER_SM_CLOCK`, FLOP per SM per clock: sm_80 2048,
   sm_90 4096, sm_100 8192; from the NVIDIA A100/H100/B200 architecture whitepapers:
   e.g. the H100 SXM's 989 TFLOP/s = 132 SMs x 1830 MHz x 4096).
2. **The name table** (:data:`_TABLE`, the vendors' datasheets, dense math) when
   ``cuda-python`` is missing, the query fails or the architecture's rate is unknown. The
   table also wins for the tensor-core peak of devices whose *reported* clock is not the
   one their datasheet peak is quoted at: H100 and H200 SXM report their 1980 MHz
   maximum boost clock, while the 989 TFLOP/s datasheet peak is quoted at the 1830 MHz
   the tensor cores sustain (:data:`_TABLE_CLOCK_WINS`). The bandwidth always comes from
   the device when it is readable.

:func:`peaks_from_attributes` holds the arithmetic and takes any attribute source, so it
is tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "DevicePeaks",
    "GPU_PEAKS",
    "TENSOR_FLOPS_PER_SM_CLOCK",
    "device_peaks",
    "peaks_by_name",
    "peaks_from_attributes",
]


@dataclass(frozen=True)
class DevicePeaks:
    """Peaks of one device.

    Attributes:
        name: the device (or table entry) name.
        hbm_bytes_per_s: memory bandwidth, bytes/s.
        bf16_flops: dense bf16 tensor-core throughput, FLOP/s.
        source: ``"device"`` (both figures derived from the device's attributes),
            ``"device+table"`` (bandwidth from the device, tensor peak from the table) or
            ``"table"`` (both from the name table).
    """

    name: str
    hbm_bytes_per_s: float
    bf16_flops: float
    source: str = "table"


TENSOR_FLOPS_PER_SM_CLOCK: dict[int, int] = {80: 2048, 90: 4096, 100: 8192}
"""Dense bf16 tensor-core FLOP per SM per clock by compute capability (``10 * major + minor``)."""

# (substring of torch.cuda.get_device_name(), peaks); first match wins, so the more
# specific names come first. Sources: NVIDIA H100/H200/A100/B200/L40S/RTX 4090 datasheets.
_TABLE: list[tuple[str, DevicePeaks]] = [
    ("H200", DevicePeaks("H200", 4.8e12, 989e12)),
    ("H100 PCIe", DevicePeaks("H100 PCIe", 2.0e12, 756e12)),
    ("H100 NVL", DevicePeaks("H100 NVL", 3.9e12, 835e12)),
    ("H100", DevicePeaks("H100 SXM", 3.35e12, 989e12)),
    ("H800", DevicePeaks("H800", 3.35e12, 989e12)),
    ("GH200", DevicePeaks("GH200", 4.0e12, 989e12)),
    ("B200", DevicePeaks("B200", 8.0e12, 2250e12)),
    ("A100-SXM4-80GB", DevicePeaks("A100 80GB", 2.039e12, 312e12)),
    ("A100", DevicePeaks("A100 40GB", 1.555e12, 312e12)),
    ("L40S", DevicePeaks("L40S", 0.864e12, 362e12)),
    ("RTX 4090", DevicePeaks("RTX 4090", 1.008e12, 165e12)),
]

_TABLE_CLOCK_WINS = ("H100", "H200", "H800", "GH200")
"""Names whose reported SM clock (max boost) overstates the clock of the datasheet tensor peak."""

GPU_PEAKS: dict[str, DevicePeaks] = {
    "h100": DevicePeaks("H100 SXM", 3.35e12, 989e12),
    "h200": DevicePeaks("H200", 4.8e12, 989e12),
    "a100": DevicePeaks("A100 80GB", 2.039e12, 312e12),
    "b200": DevicePeaks("B200", 8.0e12, 2250e12),
}
"""Datasheet peaks by short name, for modelling a device that is not at hand (``mugv.perf --gpu``)."""


def peaks_by_name(name: str) -> DevicePeaks | None:
    """The name table's entry for a ``torch.cuda.get_device_name()`` string, or None."""
    for key, peaks in _TABLE:
        if key in name:
            return peaks
    return None


def peaks_from_attributes(name: str, attr: Callable[[str], int | None]) -> DevicePeaks | None:
    """Peaks derived from device attributes, with the name table as fallback.

    Args:
        name: the device name (``torch.cuda.get_device_name()``).
        attr: returns an integer attribute or None when unreadable, for the keys
            ``"memory_clock_khz"``, ``"bus_width_bits"``, ``"sm_count"``, ``"clock_khz"``,
            ``"cc_major"``, ``"cc_minor"`` (the ``cudaDevAttr*`` values of the same meaning).

    Returns:
        :class:`DevicePeaks`, or None when neither the attributes nor the table give both
        figures.
    """
    table = peaks_by_name(name)
    mem_khz, bus = attr("memory_clock_khz"), attr("bus_width_bits")
    hbm = 2.0 * mem_khz * 1e3 * bus / 8 if mem_khz and bus else None
    sms, clk, major, minor = attr("sm_count"), attr("clock_khz"), attr("cc_major"), attr("cc_minor")
    rate = TENSOR_FLOPS_PER_SM_CLOCK.get(10 * major + minor) if major is not None and minor is not None else None
    flops = sms * clk * 1e3 * rate if sms and clk and rate else None
    if table is not None and any(key in name for key in _TABLE_CLOCK_WINS):
        flops = None  # the reported boost clock is not the clock of the datasheet peak
    if hbm is None and flops is None:
        return table
    if flops is None:
        if table is None:
            return None
        return DevicePeaks(name, hbm, table.bf16_flops, "device+table")
    if hbm is None:
        if table is None:
            return None
        return DevicePeaks(name, table.hbm_bytes_per_s, flops, "device+table")
    return DevicePeaks(name, hbm, flops, "device")


def _cuda_bindings_source(index: int) -> Callable[[str], int | None] | None:
    """An attribute source over ``cuda.bindings.runtime.cudaDeviceGetAttribute``, or None
    when ``cuda-python`` is not installed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return None
    names = {
        "memory_clock_khz": "cudaDevAttrMemoryClockRate",
        "bus_width_bits": "cudaDevAttrGlobalMemoryBusWidth",
        "sm_count": "cudaDevAttrMultiProcessorCount",
        "clock_khz": "cudaDevAttrClockRate",
        "cc_major": "cudaDevAttrComputeCapabilityMajor",
        "cc_minor": "cudaDevAttrComputeCapabilityMinor",
    }

    def attr(key: str) -> int | None:
        enum = getattr(cudart.cudaDeviceAttr, names[key], None)
        if enum is None:  # an attribute a newer toolkit dropped
            return None
        err, value = cudart.cudaDeviceGetAttribute(enum, index)
        return int(value) if err == cudart.cudaError_t.cudaSuccess else None

    return attr


def device_peaks(device: torch.device | int | None = None) -> DevicePeaks | None:
    """Peaks of a CUDA device (see the module docstring for the sources), or None on a
    machine without CUDA or for a GPU neither the attributes nor the table describe."""
    if not torch.cuda.is_available():
        return None
    index = device.index if isinstance(device, torch.device) else device
    if index is None:
        index = torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    source = _cuda_bindings_source(index)
    if source is None:
        return peaks_by_name(name)
    return peaks_from_attributes(name, source)
