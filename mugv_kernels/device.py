"""Peak figures of the GPU at hand, looked up from its name (never hard-coded to one GPU).

Used by the benchmarks (fraction of HBM peak, of bf16 dense peak) and by the trainer's
MFU. The figures are the vendors' datasheet numbers for dense (non-sparse) math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DevicePeaks", "device_peaks"]


@dataclass(frozen=True)
class DevicePeaks:
    """Datasheet peaks of one device.

    Attributes:
        name: the name matched.
        hbm_bytes_per_s: memory bandwidth, bytes/s.
        bf16_flops: dense bf16 tensor-core throughput, FLOP/s.
    """

    name: str
    hbm_bytes_per_s: float
    bf16_flops: float


# (substring of torch.cuda.get_device_name(), peaks); first match wins, so the more
# specific names come first. Sources: NVIDIA H100/H200/A100/L40S/RTX 4090 datasheets.
_TABLE: list[tuple[str, DevicePeaks]] = [
    ("H200", DevicePeaks("H200", 4.8e12, 989e12)),
    ("H100 PCIe", DevicePeaks("H100 PCIe", 2.0e12, 756e12)),
    ("H100 NVL", DevicePeaks("H100 NVL", 3.9e12, 835e12)),
    ("H100", DevicePeaks("H100 SXM", 3.35e12, 989e12)),
    ("H800", DevicePeaks("H800", 3.35e12, 989e12)),
    ("GH200", DevicePeaks("GH200", 4.0e12, 989e12)),
    ("A100-SXM4-80GB", DevicePeaks("A100 80GB", 2.039e12, 312e12)),
    ("A100", DevicePeaks("A100 40GB", 1.555e12, 312e12)),
    ("L40S", DevicePeaks("L40S", 0.864e12, 362e12)),
    ("RTX 4090", DevicePeaks("RTX 4090", 1.008e12, 165e12)),
]


def device_peaks(device: torch.device | int | None = None) -> DevicePeaks | None:
    """Peaks of a CUDA device by its name, or None (CPU, or a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in _TABLE:
        if key in name:
            return peaks
    return None
