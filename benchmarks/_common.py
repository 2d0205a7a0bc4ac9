"""Shared benchmark helpers: timing through pytest-benchmark, bytes/FLOPs, fraction of the
device's peak, and one results file per suite with device, versions, shapes and date.

On CPU the suites run tiny shapes so they stay exercised; their numbers are not recorded
as results (``record`` writes only when CUDA is present).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from mugv_kernels.device import device_peaks

RESULTS = Path(__file__).parent / "results"
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
COMPILE_BACKEND = "inductor" if ON_GPU else "aot_eager"
"""Inductor on GPU (the baseline that matters); aot_eager on CPU, where the suite only
exercises the code and a cold Inductor compile per case would dominate CI time."""


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def environment() -> dict:
    """Device and versions to attach to every recorded figure."""
    return {
        "device": torch.cuda.get_device_name() if ON_GPU else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "date": _dt.date.today().isoformat(),
    }


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def run(
    benchmark,
    fn: Callable[[], object],
    *,
    suite: str,
    case: str,
    bytes_moved: float | None = None,
    flops: float | None = None,
    rounds: int = 20,
    per_call: dict[str, float] | None = None,
    roofline: Sequence | None = None,
    **info,
) -> dict:
    """Time ``fn`` with pytest-benchmark (synchronized), attach derived figures.

    Args:
        benchmark: the pytest-benchmark fixture.
        fn: the work to time (one call = one measured iteration).
        suite: results file stem (``benchmarks/results/<suite>.jsonl``).
        case: a label (implementation + shape).
        bytes_moved: bytes that must move (reads + writes) per call, for GB/s.
        flops: useful FLOPs per call, for TFLOP/s.
        rounds: measured rounds after one warm-up (2 on CPU, where figures mean nothing).
        per_call: counts per call turned into rates, e.g. ``{"tokens": 75600}`` records
            ``tokens_per_s``.
        roofline: the :class:`mugv.perf.OpCost` entries of one call; on GPU records
            ``pct_roofline``, the modelled lower-bound time over the median (in percent).
        **info: shapes, dtype and anything else to record.

    Returns:
        The figures: median seconds, GB/s, TFLOP/s and fractions of the device peak.
    """

    def call():
        fn()
        sync()

    if benchmark.disabled:  # --benchmark-disable or xdist: run once, exercise only
        call()
        return {}
    call()  # warm-up (compilation, autotuning)
    benchmark.pedantic(call, rounds=rounds if ON_GPU else 2, iterations=1, warmup_rounds=1 if ON_GPU else 0)
    median = benchmark.stats.stats.median
    peaks = device_peaks() if ON_GPU else None
    figures = {"case": case, "median_s": median, **info}
    if bytes_moved:
        figures["GB_per_s"] = bytes_moved / median / 1e9
        if peaks:
            figures["frac_hbm_peak"] = bytes_moved / median / peaks.hbm_bytes_per_s
    if flops:
        figures["TFLOP_per_s"] = flops / median / 1e12
        if peaks:
            figures["frac_bf16_peak"] = flops / median / peaks.bf16_flops
    if roofline and peaks:
        figures["pct_roofline"] = 100.0 * sum(c.time_s(peaks) for c in roofline) / median
    for name, count in (per_call or {}).items():
        figures[f"{name}_per_s"] = count / median
    benchmark.extra_info.update(figures)
    record(suite, figures)
    return figures


def record(suite: str, figures: dict) -> None:
    """Append ``figures`` with the environment to ``results/<suite>.jsonl`` (GPU only)."""
    if not ON_GPU or os.environ.get("MUGV_BENCH_NO_RECORD"):
        return
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / f"{suite}.jsonl", "a") as f:
        f.write(json.dumps({**environment(), **figures}) + "\n")
