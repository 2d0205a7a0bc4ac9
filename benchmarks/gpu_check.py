"""One command that proves the library on a GPU within a time budget, and records every figure.

``python -m benchmarks.gpu_check --budget-s 480 --out benchmarks/results/<date>-<device>/``
(``make gpu-check``) runs, on a bare machine with cold caches:

0. a build of ``mugv_kernels._C`` (CMake + pybind11 + nvcc for sm_90a) when it is missing;
1. ``pytest -m gpu`` over ``tests/`` (every op against its reference on CUDA, the ``csrc/``
   backends, the DiT with kernels against the reference path, the VAE), with
   ``pytest-xdist`` workers when it is installed;
2. ``compute-sanitizer --tool memcheck`` over a small GPU test selection, and
   ``--tool racecheck`` over the kernels that stage tiles in shared memory, when the tool
   is found (``PATH``, ``$CUDA_HOME/bin``, ``/usr/local/cuda/bin``);
3. the headline case of every benchmark family (adaLN chain, QK-norm + RoPE, causal
   conv3d, GroupNorm+SiLU, packed varlen attention), against eager and ``torch.compile``
   (the compile baselines last);
4. one 10b-width DiT block forward + backward at 36,002 tokens, kernels vs eager vs
   ``torch.compile``, for MFU;
5. the remaining benchmark shapes, while time is left.

Each case is first called once (compilation and autotuning: timed as ``first call``),
then timed once more to extrapolate how many rounds fit its share of the budget; a case
whose estimate does not fit what is left is **skipped and named** in ``SUMMARY.md``,
never dropped. In the background, on the CPU, it counts each Triton kernel's bytes under
the interpreter against the roofline (:mod:`benchmarks.traffic`) and, when
``mugv_kernels.aot`` can write a JSON report, records the static PTX figures.

Writes into ``--out``: one JSON-lines file per family (``<family>.jsonl``: device, driver,
torch / triton / CUDA / cuDNN versions, date, shapes, figures), ``tests.jsonl`` and the logs
of each step, and ``SUMMARY.md``: per case the median, GB/s or TFLOP/s, the fraction of
the device's peak, the % of the roofline bound (:mod:`mugv.perf`), the speedup over eager
and over ``torch.compile``, and the target of the family marked met / not met; then where
the time went.

Offline: when ``.wheels/`` (``make gpu-wheels``) holds wheels, they are installed first
with ``pip install --no-index --find-links .wheels --target <tmp>`` and put on the path.

``--dry-run``: the same harness on the CPU at tiny shapes through Triton's interpreter,
writing the same files to a temporary directory (CI runs it), so the harness is known to
work before the first GPU. Its timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------- budget


class Budget:
    """Wall-clock budget of the whole run (seconds from construction)."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic):
        self.total_s = float(total_s)
        self._clock = clock
        self._t0 = clock()

    def elapsed(self) -> float:
        return self._clock() - self._t0

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def fits(self, estimate_s: float, reserve_s: float = 0.0) -> bool:
        """Whether work estimated at ``estimate_s`` ends before the budget minus ``reserve_s``."""
        return estimate_s <= self.left() - reserve_s


def plan(estimates: Sequence[tuple[str, float]], budget_s: float) -> tuple[list[str], list[tuple[str, str]]]:
    """Greedy, in priority order: run each case whose estimate fits what is left.

    Args:
        estimates: ``(name, estimated seconds)`` in priority order.
        budget_s: seconds available.

    Returns:
        ``(run, skipped)``: the names to run, and ``(name, reason)`` for each skipped one.
    """
    run, skipped, left = [], [], float(budget_s)
    for name, est in estimates:
        if est <= left:
            run.append(name)
            left -= est
        else:
            skipped.append((name, f"over budget: needs ~{est:.0f} s, {max(left, 0):.0f} s left"))
    return run, skipped


def rounds_for(per_call_s: float, share_s: float, *, min_rounds: int = 3, max_rounds: int = 20) -> int:
    """Measured rounds that fit ``share_s`` at ``per_call_s`` each, within [min, max]."""
    if per_call_s <= 0:
        return max_rounds
    return int(min(max_rounds, max(min_rounds, share_s // per_call_s)))


# ---------------------------------------------------------------------------- records


@dataclass
class StepRecord:
    """One step of the run: ``status`` is ok / failed / skipped / timeout."""

    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""


@dataclass
class CaseResult:
    """One benchmark case (``impl`` at one shape): its figures, or why it was skipped."""

    family: str
    case: str  # the shape/setting label shared by the impls compared
    impl: str
    status: str = "ok"  # ok / skipped / failed
    reason: str = ""
    shape: dict = field(default_factory=dict)
    median_s: float | None = None
    rounds: int = 0
    first_call_s: float | None = None
    setup_s: float | None = None
    bytes: float | None = None
    flops: float | None = None
    bound: str | None = None  # "memory" or "compute": which peak the fraction is of
    roofline_s: float | None = None
    GB_per_s: float | None = None
    TFLOP_per_s: float | None = None
    frac_peak: float | None = None
    pct_roofline: float | None = None
    speedup_eager: float | None = None
    speedup_compile: float | None = None
    target: str = ""
    met: bool | None = None


SUMMARY_COLUMNS = [
    "family", "case", "impl", "median ms", "GB/s", "TFLOP/s", "frac of peak", "% of roofline",
    "vs eager", "vs compile", "target", "met",
]  # fmt: skip
"""The columns of the benchmark table in ``SUMMARY.md`` (tested)."""


@dataclass
class Case:
    """A benchmark case to run: ``setup()`` builds the inputs and returns the callable to time."""

    family: str
    case: str
    impl: str
    setup: Callable[[], Callable[[], object]]
    costs: list  # mugv.perf.OpCost of one call (bytes and FLOPs derive from them)
    shape: dict = field(default_factory=dict)
    tier: int = 1
    estimate_s: float = 10.0  # prior, before anything of the family was measured
    flops: float | None = None  # useful FLOPs when they differ from the costs' (padded attention)


# ---------------------------------------------------------------------------- environment


def environment(dry_run: bool) -> dict:
    """Device, driver and versions, attached to every recorded line."""
    import torch

    env = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "dry_run": dry_run,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available() and not dry_run:
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["driver"] = _driver_version()
    else:
        env["device"] = "cpu (" + (platform.processor() or platform.machine()) + ")"
        env["driver"] = None
    with contextlib.suppress(Exception):
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None  # fmt: skip
    return env


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(Exception):
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20)  # fmt: skip
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
    with contextlib.suppress(Exception):
        from cuda.bindings import runtime as cudart

        err, v = cudart.cudaDriverGetVersion()
        if err == cudart.cudaError_t.cudaSuccess:
            return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_out(env: dict) -> Path:
    return ROOT / "benchmarks" / "results" / f"{env['date']}-{slug(env['device'].replace('NVIDIA', ''))}"


def install_wheels(wheels: Path, log: Callable[[str], None]) -> tuple[str | None, list[str]]:
    """Install every wheel in ``wheels`` into a temporary target without network; returns
    (the target directory, the installed distribution names) or (None, []) when absent."""
    files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not files:
        return None, []
    target = tempfile.mkdtemp(prefix="mugv-wheels-")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "--no-deps",
           "--target", target, *map(str, files)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        log(f"wheels: pip install from {wheels} failed: {out.stderr.strip()[-500:]}")
        return None, []
    names = [f.name.split("-")[0] + "==" + f.name.split("-")[1] for f in files]
    sys.path.insert(0, target)
    os.environ["PYTHONPATH"] = target + os.pathsep + os.environ.get("PYTHONPATH", "")
    log(f"wheels: installed {len(names)} from {wheels} into {target}: {', '.join(names)}")
    return target, names


# ---------------------------------------------------------------------------- timing


def _timer(on_gpu: bool):
    import torch

    if not on_gpu:

        def time_calls(fn, n):
            out = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return out

        return time_calls

    def time_calls(fn, n):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) / 1e3 for s, e in events]

    return time_calls


def measure(fn: Callable[[], object], share_s: float, on_gpu: bool, max_rounds: int) -> tuple[float, float, int]:
    """(first call s, median s, rounds): one first call (compile), one call to size the
    rounds, then the rounds that fit ``share_s``."""
    import torch

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    sync()
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    time_calls = _timer(on_gpu)
    probe = time_calls(fn, 1)[0]
    n = rounds_for(probe, share_s, min_rounds=1 if not on_gpu else 3, max_rounds=max_rounds)
    times = [probe] + (time_calls(fn, n - 1) if n > 1 else [])  # the sizing call is the first round
    return first, statistics.median(times), len(times)


# ---------------------------------------------------------------------------- cases


def _sum_costs(costs) -> tuple[float, float]:
    return float(sum(c.flops for c in costs)), float(sum(c.bytes for c in costs))


def benchmark_cases(dry_run: bool) -> list[Case]:
    """Every family's cases, headline shapes first (tier 1), built from the bench modules'
    own inputs and implementations (CPU shapes there when no GPU is present)."""
    import torch

    from mugv import perf

    cases: list[Case] = []

    # --- adaLN chain
    from benchmarks import bench_ada_norm as ada

    for si, (B, N, C) in enumerate(ada.SHAPES):
        for G in (1, 2):
            tier = 1 if si == 0 and G == 1 else 2
            for backward in (False, True):
                costs = [perf.norm_cost("chain", B * N, C, phase="fwd", groups=G, residual=True, gate=True)]
                if backward:
                    costs.append(perf.norm_cost("chain", B * N, C, phase="bwd", groups=G, residual=True, gate=True))
                for impl, fn in ada.IMPLS.items():

                    def setup(fn=fn, B=B, N=N, C=C, G=G, backward=backward):
                        args = ada._inputs(B, N, C, G, requires_grad=backward)
                        if not backward:
                            return lambda: _no_grad(fn, *args)
                        leaves = [a for a in args if a is not None and a.requires_grad]
                        dr, dout = torch.randn_like(args[0]), torch.randn_like(args[0])
                        return lambda: torch.autograd.grad(fn(*args), leaves, (dr, dout))

                    cases.append(Case("ada_norm", f"{'fwd+bwd' if backward else 'fwd'}/G{G}/{N}x{C}", impl, setup, costs,
                                      {"B": B, "N": N, "C": C, "G": G, "dtype": "bf16"}, tier))  # fmt: skip

    # --- QK-norm + RoPE
    from benchmarks import bench_rope as rope

    for gi, grid in enumerate(rope.GRIDS):
        n_tok = grid[0] * grid[1] * grid[2] + 2
        for backward in (False, True):
            costs = [perf.qk_norm_rope_cost("rope", n_tok, rope.HEADS, rope.HEAD_DIM, phase="fwd")]
            if backward:
                costs.append(perf.qk_norm_rope_cost("rope", n_tok, rope.HEADS, rope.HEAD_DIM, phase="bwd"))
            for impl, fn in rope.IMPLS.items():

                def setup(fn=fn, grid=grid, backward=backward):
                    args = rope._inputs(grid, requires_grad=backward)
                    if not backward:
                        return lambda: _no_grad(fn, *args)
                    q, k, _, _, qw, kw = args
                    dq, dk = torch.randn_like(q), torch.randn_like(k)
                    return lambda: torch.autograd.grad(fn(*args), (q, k, qw, kw), (dq, dk))

                cases.append(Case("rope", f"{'fwd+bwd' if backward else 'fwd'}/N{n_tok}", impl, setup, costs,
                                  {"N": n_tok, "H": rope.HEADS, "D": rope.HEAD_DIM, "dtype": "bf16"}, 1 if gi == 0 else 2))  # fmt: skip

    # --- causal conv3d and GroupNorm+SiLU
    from benchmarks import bench_conv3d as conv

    for si, (name, (B, C_in, T, H, W), C_out) in enumerate(conv.CONV_SHAPES):
        costs = [perf.causal_conv3d_cost("conv", B, C_in, T, H, W, C_out, phase="fwd", itemsize=conv.DTYPE.itemsize)]
        impls = conv.IMPL_NAMES if not dry_run else ["mugv-triton", "cudnn", "pad+cudnn", "compile"]
        for impl in impls:

            def setup(impl=impl, shape=(B, C_in, T, H, W), C_out=C_out):
                x = torch.randn(*shape, device=conv.DEVICE, dtype=conv.DTYPE)
                w = torch.randn(C_out, shape[1], 3, 3, 3, device=conv.DEVICE, dtype=conv.DTYPE) / math.sqrt(27 * shape[1])
                b = torch.randn(C_out, device=conv.DEVICE, dtype=conv.DTYPE)
                impls = conv.conv_impls(x, w, b)
                if impl not in impls:
                    raise _Skip(f"{impl} unavailable (mugv_kernels._C not built)")
                fn = impls[impl]
                return lambda: _no_grad(fn)

            cases.append(Case("conv3d", f"conv-fwd/{name}", impl, setup, costs,
                              {"x": [B, C_in, T, H, W], "c_out": C_out, "kernel": [3, 3, 3], "dtype": str(conv.DTYPE)},
                              1 if si == 0 and (impl.endswith("-cl") or impl == "compile" or dry_run) else 2))  # fmt: skip
    for si, shape in enumerate(conv.GN_SHAPES):
        B, C = shape[0], shape[1]
        G = 32 if C >= 32 else 2
        costs = [perf.group_norm_silu_cost("gn", B, C, math.prod(shape[2:]), G, phase="fwd", itemsize=conv.DTYPE.itemsize)]
        for layout in ("ncdhw", "cl"):
            for impl in (["mugv-triton", "mugv-cuda", "eager", "compile"] if not dry_run else ["mugv-triton", "eager"]):

                def setup(impl=impl, shape=shape, layout=layout, G=G):
                    from mugv_kernels._registry import cuda_extension

                    import mugv_kernels as mk

                    if impl == "mugv-cuda" and cuda_extension() is None:
                        raise _Skip("mugv_kernels._C not built")
                    x = torch.randn(shape, device=conv.DEVICE, dtype=conv.DTYPE)
                    if layout == "cl":
                        x = x.contiguous(memory_format=torch.channels_last_3d)
                    w = torch.rand(shape[1], device=conv.DEVICE, dtype=conv.DTYPE) + 0.5
                    b = torch.randn(shape[1], device=conv.DEVICE, dtype=conv.DTYPE)
                    fns = {
                        "mugv-triton": lambda: mk.group_norm_silu(x, G, w, b),
                        "mugv-cuda": lambda: mk.group_norm_silu(x, G, w, b, backend="cuda"),
                        "eager": lambda: conv.gn_eager(x, w, b),
                        "compile": lambda: conv.gn_compiled(x, w, b),
                    }
                    return lambda: _no_grad(fns[impl])

                cases.append(Case("group_norm_silu", f"fwd/{layout}/{'x'.join(map(str, shape))}", impl, setup, costs,
                                  {"x": list(shape), "groups": G, "layout": layout, "dtype": str(conv.DTYPE)},
                                  1 if si == 0 and layout == "ncdhw" else 2))  # fmt: skip

    # --- packed varlen attention
    from benchmarks import bench_varlen_attention as va

    for bi, (batch, lengths) in enumerate(va.BATCHES.items()):
        for backward in (False, True):
            costs = [perf.varlen_attention_cost("attn", lengths, lengths, va.HEADS, va.HEAD_DIM, phase="fwd",
                                                itemsize=va.DTYPE.itemsize)]  # fmt: skip
            if backward:
                costs.append(perf.varlen_attention_cost("attn", lengths, lengths, va.HEADS, va.HEAD_DIM, phase="bwd",
                                                        itemsize=va.DTYPE.itemsize))  # fmt: skip
            impls = va._backends(requires_grad=backward) + ([] if len(lengths) == 1 else ["padded"])
            if not dry_run:
                impls = [i for i in impls if i != "reference"]
            for impl in impls:

                def setup(impl=impl, lengths=lengths, backward=backward):
                    import torch.nn.functional as F

                    import mugv_kernels as mk

                    if impl == "padded":
                        q, k, v, mask = va._padded(lengths, backward)

                        def fn():
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    else:
                        q, k, v, cu, m = va._packed(lengths, backward)

                        def fn():
                            return mk.varlen_attention(q, k, v, cu, cu, m, m, backend=impl, validate=False)

                    if not backward:
                        return lambda: _no_grad(fn)
                    dout = torch.randn_like(q)
                    return lambda: torch.autograd.grad(fn(), (q, k, v), dout)

                tier = 1 if bi == 0 and impl in ("triton", "padded", "native", "torch", "flash") else 2
                useful = va.useful_flops(lengths, backward)
                cases.append(Case("varlen_attention", f"{'fwd+bwd' if backward else 'fwd'}/{batch}", impl, setup, costs,
                                  {"lengths": list(lengths), "heads": va.HEADS, "head_dim": va.HEAD_DIM,
                                   "dtype": str(va.DTYPE)}, tier if not dry_run else 1, flops=useful))  # fmt: skip
    if dry_run:  # the CPU run checks the harness, not the figures: the headline cases only
        first: dict[str, str] = {}
        keep = []
        for c in cases:  # one setting per family, and one compile baseline in all
            if c.tier != 1 or first.setdefault(c.family, c.case) != c.case:
                continue
            if c.impl == "compile" and c.family != "ada_norm":
                continue
            keep.append(c)
        cases = keep
    return cases


class _Skip(Exception):
    """A case that cannot run here (its reason is recorded)."""


def _no_grad(fn, *args):
    import torch

    with torch.no_grad():
        return fn(*args)


def block_cases(dry_run: bool) -> list[Case]:
    """The 10b-width DiT block, forward + backward at 36,002 tokens (a tiny block on CPU):
    ``kernels`` (the fused ops, ``attn_backend="auto"``), ``eager`` (the ops' PyTorch
    references, attention by per-clip SDPA) and ``compile`` (``torch.compile`` of eager)."""
    from mugv import perf

    flavor, tokens, text = ("tiny", (11,), (3,)) if dry_run else ("10b", (36002,), (120,))
    dims = perf.block_dims(flavor, tokens, text)
    costs = perf.block_ops(dims)
    out = []
    for impl in ("kernels", "eager", "compile"):

        def setup(impl=impl):
            return _block_step(dims, impl, dry_run)

        out.append(Case("dit_block", f"{flavor}-width block fwd+bwd/{sum(tokens)} tokens", impl, setup, costs,
                        {"flavor": flavor, "tokens": list(tokens), "text_tokens": list(text),
                         "dtype": "fp32" if dry_run else "bf16-autocast"}, 1,
                        estimate_s=120.0 if impl == "compile" else 30.0))  # fmt: skip
    return out


def _block_step(dims, impl: str, dry_run: bool) -> Callable[[], object]:
    import torch

    from mugv.models.dit_layers import MUGDiTBlock, PackedBatch

    dev = "cpu" if dry_run else "cuda"
    C, N, L, n = dims.hidden, sum(dims.seqlens), sum(dims.text_seqlens), len(dims.seqlens)
    block = MUGDiTBlock(C, dims.heads, dims.mlp_hidden / C, (dims.head_dim // 3,) * 3, 1e4).to(dev)

    def cu(lens):
        return torch.tensor([0, *[sum(lens[: i + 1]) for i in range(len(lens))]], device=dev, dtype=torch.int32)

    import mugv_kernels as mk

    pos = torch.cat([mk.video_positions(1, 1, s - 2, device=dev) for s in dims.seqlens]).int()
    # activations as the model hands them to a block under bf16 autocast (fp32 on the CPU)
    act = torch.float32 if dry_run else torch.bfloat16
    batch = PackedBatch(
        t_mlp=torch.randn(2 * n, 6 * C, device=dev, dtype=act) * 0.1,
        index=(torch.arange(N, device=dev) % 7 == 0).int()[None], positions=pos, cu_seqlens=cu(dims.seqlens),
        max_seqlen=max(dims.seqlens), text=torch.randn(L, C, device=dev, dtype=act),
        text_cu_seqlens=cu(dims.text_seqlens), text_max_seqlen=max(dims.text_seqlens),
        backend="auto" if impl == "kernels" else "reference", attn_backend="auto" if impl == "kernels" else "sdpa",
    )  # fmt: skip
    x = torch.randn(1, N, C, device=dev, dtype=act, requires_grad=True)
    fn = block
    if impl == "compile":
        from benchmarks._common import COMPILE_BACKEND

        fn = torch.compile(block, backend=COMPILE_BACKEND)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if not dry_run else contextlib.nullcontext()

    def step():
        with autocast:
            out = fn(x, batch)
        out.float().square().mean().backward()
        block.zero_grad(set_to_none=True)
        x.grad = None

    return step


# ---------------------------------------------------------------------------- targets


TARGETS = {
    "ada_norm": ">= 85% HBM peak and >= 1.3x compile",
    "rope": ">= 85% HBM peak and >= 1.3x compile",
    "group_norm_silu": ">= 80% HBM peak",
    "conv3d": ">= cuDNN F.conv3d (pre-padded input)",
    "varlen_attention": ">= 1.3x padded SDPA useful TFLOP/s",
    "dit_block": ">= 45% MFU",
}
"""Each family's target (against the device's peaks), shown on the rows of our kernels."""

OURS = {"mugv", "mugv-triton", "mugv-triton-cl", "mugv-cuda-cl", "mugv-cuda", "kernels"}


def _ours(r: CaseResult) -> bool:
    return r.impl in OURS or (r.family == "varlen_attention" and r.impl not in ("padded", "reference"))


def evaluate_targets(results: list[CaseResult]) -> None:
    """Fill ``speedup_eager``, ``speedup_compile``, ``target`` and ``met`` in place."""
    ok = [r for r in results if r.status == "ok" and r.median_s]
    by_case: dict[tuple[str, str], dict[str, CaseResult]] = {}
    for r in ok:
        by_case.setdefault((r.family, r.case), {})[r.impl] = r
    for (family, _), impls in by_case.items():
        eager = impls.get("eager") or impls.get("pad+cudnn") or impls.get("padded")
        comp = impls.get("compile")
        for r in impls.values():
            if eager is not None and r is not eager:
                r.speedup_eager = eager.median_s / r.median_s
            if comp is not None and r is not comp:
                r.speedup_compile = comp.median_s / r.median_s
            if not _ours(r):
                continue
            r.target = TARGETS.get(family, "")
            if family in ("ada_norm", "rope"):
                r.met = _all(r.frac_peak, 0.85, r.speedup_compile, 1.3)
            elif family == "group_norm_silu":
                r.met = None if r.frac_peak is None else r.frac_peak >= 0.80
            elif family == "conv3d":
                layout_cl = r.impl.endswith("-cl")
                ref = impls.get("cudnn-cl" if layout_cl else "cudnn")
                r.met = None if ref is None else ref.median_s / r.median_s >= 1.0
            elif family == "varlen_attention":
                pad = impls.get("padded")
                r.met = None if pad is None else pad.median_s / r.median_s >= 1.3
            elif family == "dit_block":
                r.met = None if r.frac_peak is None else r.frac_peak >= 0.45


def _all(frac, frac_min, speedup, speedup_min) -> bool | None:
    if frac is None or speedup is None:
        return None
    return frac >= frac_min and speedup >= speedup_min


def figures(result: CaseResult, case: Case, peaks) -> None:
    """Derived figures of a timed case: GB/s, TFLOP/s, fraction of peak, % of roofline."""
    flops, nbytes = _sum_costs(case.costs)
    useful = case.flops if case.flops is not None else flops
    result.bytes, result.flops = nbytes, useful
    t = result.median_s
    compute_bound = bool(flops) and (peaks is None or flops / peaks.bf16_flops >= nbytes / peaks.hbm_bytes_per_s)
    result.bound = "compute" if compute_bound else "memory"
    result.GB_per_s = nbytes / t / 1e9
    if useful:
        result.TFLOP_per_s = useful / t / 1e12
    if peaks is not None:
        result.frac_peak = (useful / t / peaks.bf16_flops) if compute_bound else (nbytes / t / peaks.hbm_bytes_per_s)
        result.roofline_s = sum(c.time_s(peaks) for c in case.costs)
        result.pct_roofline = 100.0 * result.roofline_s / t


# ---------------------------------------------------------------------------- the run


class Run:
    """State of one gpu_check run (see the module docstring)."""

    def __init__(self, args, budget: Budget):
        self.args = args
        self.budget = budget
        self.dry_run = args.dry_run
        self.out = Path(args.out)
        self.steps: list[StepRecord] = []
        self.results: list[CaseResult] = []
        self.breakdown: list[tuple[str, float]] = []  # (what, seconds) in order
        self.notes: list[str] = []
        self.tests: dict = {}
        self.sanitizer: list[dict] = []
        self.traffic_md: str | None = None
        self.aot: dict | None = None
        self.peaks = None
        self.env: dict = {}
        self.log_lines: list[str] = []

    def log(self, msg: str) -> None:
        line = f"[{self.budget.elapsed():6.1f}s] {msg}"
        self.log_lines.append(line)
        print(line, flush=True)

    def step(self, name: str, fn: Callable[[], StepRecord | None], share_s: float | None = None) -> None:
        if name in self.args.skip:
            self.steps.append(StepRecord(name, "skipped", 0.0, "--skip"))
            return
        t = time.monotonic()
        try:
            rec = fn() or StepRecord(name, "ok")
        except Exception as e:  # a broken step is reported; the others still run
            rec = StepRecord(name, "failed", detail=f"{type(e).__name__}: {e}")
            self.log(f"{name}: FAILED: {rec.detail}")
        rec.name, rec.seconds = name, time.monotonic() - t
        self.steps.append(rec)
        self.breakdown.append((name, rec.seconds))
        self.log(f"{name}: {rec.status} in {rec.seconds:.1f} s {rec.detail}")

    # --- subprocess helper

    def _subprocess(self, cmd: list[str], timeout: float, logname: str, env: dict | None = None):
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        with open(self.out / logname, "w") as logf:
            p = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=logf, stderr=subprocess.STDOUT)
            try:
                return p.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                # SIGINT first: pytest stops and still writes its JUnit file with what finished
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                return None

    # --- step 0: the CUDA extension

    def build_csrc(self) -> StepRecord:
        """Build ``mugv_kernels._C`` in place (CMake + pybind11 + nvcc, sm_90a) when it is
        missing, so the tests and benchmarks cover the ``csrc/`` backends."""
        if self.dry_run:
            return StepRecord("csrc", "skipped", detail="dry run (CI builds csrc/ in tests/kernels/test_csrc.py)")
        from mugv_kernels._registry import cuda_extension

        if cuda_extension() is not None:
            return StepRecord("csrc", "ok", detail="mugv_kernels._C already built")
        nvcc = next((c for c in (os.environ.get("CUDACXX"), shutil.which("nvcc"),
                                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
                     if c and os.path.exists(c)), None)  # fmt: skip
        cmake = shutil.which("cmake")
        try:
            import pybind11
        except ImportError:
            pybind11 = None
        missing = [n for n, v in (("nvcc", nvcc), ("cmake", cmake), ("pybind11", pybind11)) if v is None]
        if missing:
            return StepRecord("csrc", "skipped", detail=f"cannot build mugv_kernels._C: {', '.join(missing)} not found "
                                                        "(the backend='cuda' cases skip)")  # fmt: skip
        build = ROOT / "build" / "csrc-gpu-check"
        share = self._share(0.12)
        t0 = time.monotonic()
        configure = [cmake, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ROOT / 'mugv_kernels'}",
                     f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                     f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DMUGV_CUDA_ARCHS={os.environ.get('MUGV_CUDA_ARCHS', '90a')}"]  # fmt: skip
        for i, cmd in enumerate((configure, [cmake, "--build", str(build), "-j", str(os.cpu_count() or 4)])):
            rc = self._subprocess(cmd, share - (time.monotonic() - t0), f"csrc-{'configure' if i == 0 else 'build'}.log")
            if rc != 0:
                why = "timed out" if rc is None else f"exit {rc}"
                return StepRecord("csrc", "failed", detail=f"{'configure' if i == 0 else 'build'} {why} (csrc-*.log)")
        importlib.invalidate_caches()
        if cuda_extension() is None:
            return StepRecord("csrc", "failed", detail="built, but mugv_kernels._C does not import")
        return StepRecord("csrc", "ok", detail="built mugv_kernels._C (sm_90a)")

    # --- step 1

    def pytest_gpu(self) -> StepRecord:
        share = self._share(self.args.share_tests)
        junit = self.out / "pytest-gpu.xml"
        paths = ["tests/kernels/test_gpu.py"] if self.dry_run else ["tests"]
        workers = []  # Triton compiles in each worker process: cold caches warm several times faster
        if not self.dry_run and importlib.util.find_spec("xdist") is not None:
            workers = ["-n", str(min(4, os.cpu_count() or 1))]
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--durations=15",
               f"--junitxml={junit}", *workers, *paths]  # fmt: skip
        rc = self._subprocess(cmd, share, "pytest-gpu.log")
        self.tests = parse_junit(junit)  # on a timeout: what finished before the interrupt
        if rc is None:
            with open(self.out / "tests.jsonl", "w") as f:
                for case in self.tests.get("cases", []):
                    f.write(json.dumps({**self.env, **case}) + "\n")
                f.write(json.dumps({**self.env, "test": "pytest -m gpu", "status": "timeout", "seconds": share}) + "\n")
            t = self.tests
            return StepRecord("tests", "timeout", detail=f"pytest -m gpu interrupted after {share:.0f} s: {t['passed']} "
                                                         f"passed, {t['failed']} failed before it (pytest-gpu.log)")  # fmt: skip
        with open(self.out / "tests.jsonl", "w") as f:
            for case in self.tests.get("cases", []):
                f.write(json.dumps({**self.env, **case}) + "\n")
        t = self.tests
        detail = f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
        return StepRecord("tests", "ok" if rc in (0, 5) and not t["failed"] else "failed", detail=detail)

    # --- step 2

    def sanitize(self) -> StepRecord:
        tool = find_sanitizer()
        if tool is None:
            return StepRecord("sanitizer", "skipped", detail="compute-sanitizer not found")
        share = self._share(self.args.share_sanitizer)
        runs = [("memcheck", "sanitize"), ("racecheck", "sanitize_shared_memory")]
        failed = False
        for i, (kind, select) in enumerate(runs):
            per = share / (len(runs) - i) if i == 0 else min(share, self.budget.left() - self._reserve())
            cmd = [tool, "--tool", kind, "--error-exitcode", "3", "--target-processes", "all", sys.executable, "-m",
                   "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/kernels/test_gpu.py", "-k", select]  # fmt: skip
            t = time.monotonic()
            rc = self._subprocess(cmd, per, f"sanitizer-{kind}.log")
            text = (self.out / f"sanitizer-{kind}.log").read_text(errors="replace")
            errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
            status = "timeout" if rc is None else ("ok" if rc == 0 else "failed")
            failed |= status == "failed"
            self.sanitizer.append({"tool": kind, "selection": select, "status": status, "rc": rc,
                                   "errors": int(errors[-1]) if errors else None, "seconds": time.monotonic() - t})  # fmt: skip
            share -= time.monotonic() - t
        return StepRecord("sanitizer", "failed" if failed else "ok", detail=", ".join(f"{s['tool']} {s['status']}" for s in self.sanitizer))

    # --- steps 3-5

    def run_cases(self, cases: list[Case], share_s: float, label: str) -> StepRecord:
        """Run ``cases`` in order within ``share_s`` seconds (each skipped when its estimate
        does not fit), estimating each case from the last measured one of its family."""
        import torch

        on_gpu = torch.cuda.is_available() and not self.dry_run
        deadline = time.monotonic() + min(share_s, self.budget.left() - self._reserve())
        last: dict[str, float] = {}  # family -> seconds the last case took
        ran = skipped = failed = 0
        for case in cases:
            left = deadline - time.monotonic()
            est = last.get(case.family, case.estimate_s)
            if case.impl == "compile":
                est = max(est, case.estimate_s)
            r = CaseResult(case.family, case.case, case.impl, shape=case.shape)
            if est > left:
                r.status, r.reason = "skipped", f"over budget: needs ~{est:.0f} s, {max(left, 0):.0f} s left"
                self.results.append(r)
                skipped += 1
                continue
            t0 = time.monotonic()
            try:
                fn = case.setup()
                r.setup_s = time.monotonic() - t0
                r.first_call_s, r.median_s, r.rounds = measure(fn, min(self.args.case_s, max(left - est, 0.5)), on_gpu,
                                                               self.args.max_rounds)  # fmt: skip
                figures(r, case, self.peaks)
                ran += 1
            except _Skip as e:
                r.status, r.reason = "skipped", str(e)
                skipped += 1
            except Exception as e:
                r.status, r.reason = "failed", f"{type(e).__name__}: {str(e)[:300]}"
                failed += 1
                self.log(f"  {case.family} {case.case} {case.impl}: FAILED {r.reason}")
            finally:
                fn = None  # free the inputs of a finished case
                if on_gpu:
                    torch.cuda.empty_cache()
            spent = time.monotonic() - t0
            last[case.family] = spent
            self.results.append(r)
            self.breakdown.append((f"  {case.family} {case.case} {case.impl}", spent))
            if r.status == "ok":
                self.log(f"  {case.family:16s} {case.case:34s} {case.impl:14s} median {r.median_s * 1e3:9.3f} ms "
                         f"(first call {r.first_call_s:.1f} s, {r.rounds} rounds)")  # fmt: skip
        return StepRecord(label, "failed" if failed else "ok", detail=f"{ran} ran, {skipped} skipped, {failed} failed")

    def _share(self, frac: float) -> float:
        return max(1.0, min(frac * self.budget.total_s, self.budget.left() - self._reserve()))

    def _reserve(self) -> float:
        return 3.0 if self.dry_run else 10.0  # writing the summary

    # --- background CPU work

    def start_background(self) -> list[tuple[str, subprocess.Popen, float]]:
        procs = []
        if "traffic" not in self.args.skip:
            env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
            env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
            f = open(self.out / "traffic.md", "w")
            only = ["ada_layer_norm fwd"] if self.dry_run else []  # the dry run: one case
            procs.append(("traffic", subprocess.Popen([sys.executable, "-m", "benchmarks.traffic", *only], cwd=ROOT, env=env,
                                                      stdout=f, stderr=subprocess.STDOUT), time.monotonic()))  # fmt: skip
        if "aot" not in self.args.skip and not self.dry_run:
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            f = open(self.out / "aot.log", "w")
            procs.append(("aot", subprocess.Popen([sys.executable, "-m", "mugv_kernels.aot", "--json", str(self.out / "aot.json")],
                                                  cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), time.monotonic()))  # fmt: skip
        return procs

    def join_background(self, procs) -> None:
        for name, p, t0 in procs:
            left = max(0.5, self.budget.left() - self._reserve() / 2)
            try:
                rc = p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                rc = None
            self.breakdown.append((f"background: {name} (on CPU, overlapped)", time.monotonic() - t0))
            if name == "traffic":
                text = (self.out / "traffic.md").read_text(errors="replace")
                self.traffic_md = text if rc == 0 else None
                if rc != 0:
                    self.notes.append(f"kernel traffic: {'timed out' if rc is None else f'exit {rc}'} (traffic.md)")
            elif name == "aot":
                path = self.out / "aot.json"
                if rc == 0 and path.exists():
                    with contextlib.suppress(Exception):
                        self.aot = json.loads(path.read_text())
                if self.aot is None:
                    self.notes.append("AOT PTX report: not written (aot.log)")


def find_sanitizer() -> str | None:
    """``compute-sanitizer`` from PATH, ``$CUDA_HOME/bin`` or ``/usr/local/cuda/bin``."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and os.access(os.path.join(base, "bin", "compute-sanitizer"), os.X_OK):
            return os.path.join(base, "bin", "compute-sanitizer")
    return None


def parse_junit(path: Path) -> dict:
    """Counts, failures and skip reasons from a pytest JUnit XML file."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "skip_reasons": {}, "failures": [], "cases": [], "slowest": []}
    if not path.exists():
        return out
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        secs = float(tc.get("time", 0) or 0)
        status = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                status = "failed"
                out["failures"].append({"test": name, "message": (child.get("message") or "")[:300]})
            elif child.tag == "skipped":
                status = "skipped"
                reason = (child.get("message") or "").strip()
                out["skip_reasons"][reason] = out["skip_reasons"].get(reason, 0) + 1
        out[status] += 1
        out["cases"].append({"test": name, "status": status, "seconds": secs})
    out["slowest"] = sorted(out["cases"], key=lambda c: -c["seconds"])[:10]
    return out


# ---------------------------------------------------------------------------- outputs


def _fmt(v, spec: str, scale: float = 1.0) -> str:
    return "–" if v is None else format(v * scale, spec)


def _num(v) -> str:
    """Three significant figures, no exponent for the usual ranges."""
    if v is None:
        return "–"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def summary_table(results: list[CaseResult]) -> str:
    rows = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + " --- |" * len(SUMMARY_COLUMNS)]
    for r in results:
        if r.status != "ok":
            continue
        met = "–" if r.met is None else ("met" if r.met else "not met")
        if not _ours(r):
            met = ""
        cells = [
            r.family, r.case, r.impl, _fmt(r.median_s, ".3f", 1e3), _num(r.GB_per_s), _num(r.TFLOP_per_s),
            _fmt(r.frac_peak, ".1%") + (f" ({'HBM' if r.bound == 'memory' else 'bf16'})" if r.frac_peak is not None else ""),
            _fmt(r.pct_roofline, ".0f") + ("%" if r.pct_roofline is not None else ""),
            _fmt(r.speedup_eager, ".2f") + ("x" if r.speedup_eager is not None else ""),
            _fmt(r.speedup_compile, ".2f") + ("x" if r.speedup_compile is not None else ""),
            r.target if _ours(r) else "", met,
        ]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_outputs(run: Run) -> Path:
    """The per-family JSONL files and ``SUMMARY.md``; returns the summary's path."""
    out = run.out
    families: dict[str, list[CaseResult]] = {}
    for r in run.results:
        families.setdefault(r.family, []).append(r)
    for fam, rs in families.items():
        with open(out / f"{fam}.jsonl", "w") as f:
            for r in rs:
                f.write(json.dumps({**run.env, **dataclasses.asdict(r)}) + "\n")
    env, p = run.env, run.peaks
    lines = [
        f"# gpu_check {env['date']} on {env['device']}" + (" (DRY RUN on CPU: timings mean nothing)" if run.dry_run else ""),
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, driver {env.get('driver')}, "
        f"Python {env['python']}, commit {env.get('commit')}.",
        "Peaks: " + (f"{p.name}: {p.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, {p.bf16_flops / 1e12:.0f} TFLOP/s bf16 dense "
                     f"(source: {p.source})." if p else "none (no fraction of peak or roofline figures)."),
        f"Budget {run.budget.total_s:.0f} s, used {run.budget.elapsed():.0f} s.",
        "",
        "## Steps",
        "",
        "| step | status | seconds | detail |",
        "| --- | --- | ---: | --- |",
    ]  # fmt: skip
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |" for s in run.steps]
    t = run.tests
    lines += ["", "## GPU tests", ""]
    if not t:
        step = next((s for s in run.steps if s.name == "tests"), None)
        lines.append(f"No results: {step.status + ' (' + step.detail + ')' if step else 'not run'}.")
    else:
        lines += [f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped."]
        lines += [f"- FAILED `{f['test']}`: {f['message']}" for f in t["failures"]]
        lines += [f"- skipped ({n}): {reason}" for reason, n in sorted(t["skip_reasons"].items())]
        lines += ["", "Slowest: " + ", ".join(f"`{c['test'].split('::')[-1]}` {c['seconds']:.1f} s" for c in t["slowest"][:5])]
    if run.sanitizer:
        lines += ["", "## compute-sanitizer", ""]
        lines += [f"- {s['tool']} over `-k {s['selection']}`: {s['status']} (errors: {s['errors']}, {s['seconds']:.0f} s)"
                  for s in run.sanitizer]  # fmt: skip
    lines += ["", "## Benchmarks", "",
              "Fraction of peak: of HBM bandwidth for memory-bound ops (minimum bytes of `mugv.perf`), of bf16 dense "
              "for compute-bound ones (useful FLOPs). % of roofline: the modelled lower-bound time over the median.",
              "", summary_table(run.results)]  # fmt: skip
    skipped = [r for r in run.results if r.status != "ok"]
    if skipped:
        lines += ["", "### Not measured", ""]
        lines += [f"- {r.family} {r.case} {r.impl}: {r.status}: {r.reason}" for r in skipped]
    lines += ["", "## Targets", ""]
    for fam, target in TARGETS.items():
        rows = [r for r in run.results if r.family == fam and _ours(r) and r.status == "ok"]
        verdicts = [r.met for r in rows]
        state = "not measured" if not rows else ("met" if all(v is True for v in verdicts) else
                                                 "not met" if any(v is False for v in verdicts) else "undecided")  # fmt: skip
        lines.append(f"- {fam}: {target}: **{state}**" + (f" ({len(rows)} rows)" if rows else ""))
    if run.aot:
        lines += ["", "## Static PTX report (mugv_kernels.aot, sm_90a)", "", _aot_table(run.aot)]
    if run.traffic_md:
        lines += ["", "## Kernel traffic under the interpreter (bytes vs the roofline minimum)", "", run.traffic_md.strip()]
    lines += ["", "## Where the time went", "", "| what | seconds |", "| --- | ---: |"]
    lines += [f"| {what} | {secs:.1f} |" for what, secs in run.breakdown]
    if run.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in run.notes]
    path = out / "SUMMARY.md"
    path.write_text("\n".join(lines) + "\n")
    return path


AOT_COLUMNS = [
    ("family", ("family",)), ("kernel", ("kernel",)), ("variant", ("variant",)), ("warps", ("num_warps",)),
    ("regs", ("registers",)), ("spill B", ("spill_bytes",)), ("smem B", ("shared_bytes",)),
    ("warps/SM", ("occupancy", "warps_per_sm")), ("limiter", ("occupancy", "limiter")), ("wgmma", ("mma", "wgmma")),
    ("mma.sync", ("mma", "mma_sync")), ("128-bit main loads", ("main_load_share_128",)), ("ok", ("ok",)),
]  # fmt: skip
"""Per-kernel columns of ``python -m mugv_kernels.aot --json`` shown in ``SUMMARY.md``."""


def _aot_table(aot) -> str:
    """A Markdown table of the AOT JSON (schema 1 of :mod:`mugv_kernels.aot`), one row per kernel."""
    rows = aot.get("kernels") if isinstance(aot, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return "(unrecognized layout; see aot.json)"

    def get(r, path):
        for key in path:
            r = r.get(key) if isinstance(r, dict) else None
        if isinstance(r, float):
            return f"{r:.0%}" if path == ("main_load_share_128",) else f"{r:.3g}"
        return "–" if r is None else str(r)

    out = ["| " + " | ".join(c for c, _ in AOT_COLUMNS) + " |", "|" + " --- |" * len(AOT_COLUMNS)]
    out += ["| " + " | ".join(get(r, path) for _, path in AOT_COLUMNS) + " |" for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget in seconds (default 480; 90 dry run)")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results/<date>-<device>/; "
                                               "a temporary directory for --dry-run)")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, temp output")
    p.add_argument("--peaks", choices=["h100", "h200", "a100", "b200"], default=None,
                   help="use these datasheet peaks instead of the device's (the dry run exercises the figures this way)")
    p.add_argument("--skip", action="append", default=[],
                   help="skip a step: csrc, tests, sanitizer, benchmarks, block, more-benchmarks, traffic, aot (repeatable)")
    p.add_argument("--wheels", default=str(ROOT / ".wheels"), help="offline wheels folder (default .wheels/)")
    p.add_argument("--share-tests", type=float, default=0.25, help="budget fraction for pytest -m gpu (0.25)")
    p.add_argument("--share-sanitizer", type=float, default=0.12, help="budget fraction for compute-sanitizer (0.12)")
    p.add_argument("--share-benchmarks", type=float, default=0.33, help="budget fraction for the headline cases (0.33)")
    p.add_argument("--case-s", type=float, default=None, help="seconds of measured rounds per case (3; 0.2 dry run)")
    p.add_argument("--max-rounds", type=int, default=None, help="rounds per case at most (20; 2 dry run)")
    args = p.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 90.0 if args.dry_run else 480.0
    if args.case_s is None:
        args.case_s = 0.2 if args.dry_run else 3.0
    if args.max_rounds is None:
        args.max_rounds = 2 if args.dry_run else 20
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports mugv_kernels
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ.setdefault("MUGV_BENCH_NO_RECORD", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="mugv-inductor-"))
    env = environment(args.dry_run)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="mugv-gpu-check-") if args.dry_run else str(default_out(env))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    run = Run(args, budget)
    run.env = env
    run.log(f"gpu_check: {env['device']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
            f"budget {args.budget_s:.0f} s -> {args.out}")  # fmt: skip

    t = time.monotonic()
    _, installed = install_wheels(Path(args.wheels), run.log)
    if installed:
        run.notes.append(f"installed from {args.wheels}: {', '.join(installed)}")
    run.breakdown.append(("offline wheels", time.monotonic() - t))

    t = time.monotonic()
    from mugv_kernels.device import GPU_PEAKS, device_peaks

    run.peaks = GPU_PEAKS[args.peaks] if args.peaks else (None if args.dry_run else device_peaks())
    if args.peaks and args.dry_run:
        run.notes.append(f"dry run: CPU timings set against {run.peaks.name} datasheet peaks only to exercise the figures")
    bench_cases = benchmark_cases(args.dry_run)
    blocks = block_cases(args.dry_run)
    run.breakdown.append(("imports and case setup", time.monotonic() - t))

    background = run.start_background()
    run.step("csrc", run.build_csrc)
    run.step("tests", run.pytest_gpu)
    run.step("sanitizer", run.sanitize)
    # the headline cases, torch.compile baselines last (a cold Inductor compile costs the most)
    tier1 = sorted((c for c in bench_cases if c.tier == 1), key=lambda c: c.impl == "compile")
    tier2 = [c for c in bench_cases if c.tier != 1]
    run.step("benchmarks", lambda: run.run_cases(tier1, run._share(args.share_benchmarks), "benchmarks"))
    run.step("block", lambda: run.run_cases(blocks, budget.left() - run._reserve(), "block"))
    run.step("more-benchmarks", lambda: run.run_cases(tier2, budget.left() - run._reserve(), "more-benchmarks"))
    run.join_background(background)
    evaluate_targets(run.results)
    path = write_outputs(run)
    (run.out / "gpu_check.log").write_text("\n".join(run.log_lines) + "\n")
    run.log(f"wrote {path}")
    print("\nWhere the time went:")
    for what, secs in run.breakdown:
        print(f"  {secs:7.1f} s  {what}")
    failed = [s for s in run.steps if s.status == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
