"""Roofline model of one MUG-V DiT block: FLOPs, minimum HBM bytes and lower-bound time per op.

``python -m mugv.perf --flavor 10b --tokens 36002 [--text-tokens 120] [--gpu h100|h200|a100|b200]``
prints every op of one DiT block as the kernel path runs it (forward, then backward):
FLOPs, the minimum HBM bytes, arithmetic intensity (FLOP/byte), which roof binds, and the
lower-bound time ``max(FLOPs / peak FLOP/s, bytes / peak bandwidth)`` at the device's peaks
(:data:`mugv_kernels.device.GPU_PEAKS`, or the GPU at hand without ``--gpu``). Its totals
give attention's share of the FLOPs, the lower bound of the block's (and the model's) step
time and the MFU ceiling ``model FLOPs / (lower bound x peak FLOP/s)``. Every figure it
prints is **modelled**, not measured.

Counting rules (the sources of the math):

* FLOPs are model FLOPs, 2 per multiply-add: a linear ``[M, K] -> [M, N]`` is ``2 M K N``
  forward and twice that backward (dX and dW); attention is ``4 H D sum_b Nq_b Nk_b``
  forward (QK^T and PV) and twice that backward (dV, dP, dQ, dK). The recomputation a
  flash-attention backward (or activation checkpointing) performs is hardware work, not
  model work, and is not counted (MFU convention, PaLM appendix B). Normalization and
  element-wise FLOPs are not counted either; those ops are bound by memory. The counts
  equal ``torch.utils.flop_counter.FlopCounterMode`` of the block on the meta device
  (the tests check this).
* Bytes are the reads and writes that must reach HBM, derived from the sizes of the
  tensors each op reads and writes (each read or written once; weights at the activation
  dtype, as FSDP2's mixed precision casts them; saved statistics fp32). A backward op
  that computes both dX and dW reads dY once.
* The block's ops are those of ``MUGDiTBlock`` on the kernel path: four fused adaLN
  boundaries, QK-norm+RoPE, packed varlen attention, the linears, an unfused GELU.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from mugv_kernels.device import GPU_PEAKS, DevicePeaks, device_peaks

__all__ = [
    "BlockDims",
    "OpCost",
    "TensorSize",
    "Totals",
    "block_dims",
    "block_ops",
    "causal_conv3d_cost",
    "gelu_cost",
    "group_norm_silu_cost",
    "linear_cost",
    "main",
    "norm_cost",
    "qk_norm_rope_cost",
    "table",
    "totals",
    "varlen_attention_cost",
]

FP32 = 4
INT32 = 4


@dataclass(frozen=True)
class TensorSize:
    """One tensor an op reads or writes: ``name``, ``shape`` and ``itemsize`` (bytes)."""

    name: str
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class OpCost:
    """Modelled cost of one op.

    Attributes:
        name: the op (``"qkv"``, ``"self_attn"``, ``"adaln_msa"``...).
        phase: ``"fwd"`` or ``"bwd"``.
        kind: ``"gemm"``, ``"attention"`` or ``"memory"`` (norms, RoPE, element-wise).
        flops: model FLOPs.
        reads, writes: the tensors that must be read from / written to HBM.
    """

    name: str
    phase: str
    kind: str
    flops: float
    reads: tuple[TensorSize, ...] = ()
    writes: tuple[TensorSize, ...] = ()

    @property
    def read_bytes(self) -> int:
        return sum(t.nbytes for t in self.reads)

    @property
    def write_bytes(self) -> int:
        return sum(t.nbytes for t in self.writes)

    @property
    def bytes(self) -> int:
        """Minimum HBM bytes (reads + writes)."""
        return self.read_bytes + self.write_bytes

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.bytes if self.bytes else math.inf

    def time_s(self, peaks: DevicePeaks) -> float:
        """Lower-bound time at ``peaks``: the slower of the compute and the memory roof."""
        return max(self.flops / peaks.bf16_flops, self.bytes / peaks.hbm_bytes_per_s)

    def bound(self, peaks: DevicePeaks) -> str:
        return "compute" if self.flops / peaks.bf16_flops >= self.bytes / peaks.hbm_bytes_per_s else "memory"


def _t(name: str, *shape: int, itemsize: int) -> TensorSize:
    return TensorSize(name, tuple(int(s) for s in shape), itemsize)


# ----------------------------------------------------------------------------------------
# One cost function per op family (used by the block table, the benchmarks and the tests)
# ----------------------------------------------------------------------------------------


def linear_cost(name: str, M: int, K: int, N: int, *, phase: str, itemsize: int = 2, bias: bool = True) -> OpCost:
    """``Y [M, N] = X [M, K] @ W[N, K]^T + b``; the backward gives dX, dW (and db)."""
    x, w, y = _t("x", M, K, itemsize=itemsize), _t("weight", N, K, itemsize=itemsize), _t("y", M, N, itemsize=itemsize)
    b = (_t("bias", N, itemsize=itemsize),) if bias else ()
    if phase == "fwd":
        return OpCost(name, "fwd", "gemm", 2.0 * M * K * N, (x, w, *b), (y,))
    dy, dx, dw = _t("dy", M, N, itemsize=itemsize), _t("dx", M, K, itemsize=itemsize), _t("dweight", N, K, itemsize=itemsize)
    db = (_t("dbias", N, itemsize=itemsize),) if bias else ()
    return OpCost(name, "bwd", "gemm", 4.0 * M * K * N, (dy, x, w), (dx, dw, *db))


def varlen_attention_cost(
    name: str,
    seqlens_q: Sequence[int],
    seqlens_k: Sequence[int],
    heads: int,
    head_dim: int,
    *,
    phase: str,
    itemsize: int = 2,
) -> OpCost:
    """Packed attention of query segment ``b`` to key segment ``b`` (``[T, H, D]`` THD
    tensors, int32 ``cu_seqlens`` offsets (one tensor when the segments of q and k are the
    same, as in self-attention), fp32 log-sum-exp ``[H, Tq]`` saved for the backward)."""
    if len(seqlens_q) != len(seqlens_k):
        raise ValueError(f"seqlens_q and seqlens_k must have one length per segment, got {len(seqlens_q)} and {len(seqlens_k)}")
    Tq, Tk, H, D = sum(seqlens_q), sum(seqlens_k), heads, head_dim
    fwd = 4.0 * H * D * sum(nq * nk for nq, nk in zip(seqlens_q, seqlens_k))
    q, k, v, o = (_t(n, T, H, D, itemsize=itemsize) for n, T in (("q", Tq), ("k", Tk), ("v", Tk), ("out", Tq)))
    lse = _t("lse", H, Tq, itemsize=FP32)
    n = len(seqlens_q)
    cu = (_t("cu_seqlens", n + 1, itemsize=INT32),)
    if tuple(seqlens_q) != tuple(seqlens_k):
        cu = (_t("cu_seqlens_q", n + 1, itemsize=INT32), _t("cu_seqlens_k", n + 1, itemsize=INT32))
    if phase == "fwd":
        return OpCost(name, "fwd", "attention", fwd, (q, k, v, *cu), (o, lse))
    do, dq, dk, dv = (_t(n, T, H, D, itemsize=itemsize) for n, T in (("dout", Tq), ("dq", Tq), ("dk", Tk), ("dv", Tk)))
    return OpCost(name, "bwd", "attention", 2.0 * fwd, (do, q, k, v, o, lse, *cu), (dq, dk, dv))


def norm_cost(
    name: str,
    N: int,
    C: int,
    *,
    phase: str,
    groups: int = 1,
    residual: bool = False,
    gate: bool = False,
    modulation: bool = True,
    affine: bool = False,
    rms: bool = False,
    norm: bool = True,
    itemsize: int = 2,
) -> OpCost:
    """The adaLN family (:func:`mugv_kernels.gated_residual_ada_layer_norm` and its parts)
    over ``N`` tokens of width ``C`` with ``groups`` modulation sets chosen by an int32
    index (``groups=1``: one set, no index).

    Forward: ``r = residual + gate * y`` (``residual=True``), ``out = (norm(r) * weight +
    bias) * (1 + scale) + shift`` (``norm=True``; ``modulation`` for shift/scale,
    ``affine`` for weight/bias); fp32 mean (LayerNorm) and rstd per row are saved.
    Backward: from ``dout`` (and ``dr``) to the gradients of every input.
    """
    a, f = itemsize, FP32
    x_name = "y" if residual else "x"
    mods = [n for n, on in (("shift", modulation and norm), ("scale", modulation and norm), ("gate", gate)) if on]
    mod = [_t(n, groups, C, itemsize=a) for n in mods]
    index = [_t("index", N, itemsize=INT32)] if groups > 1 and mods else []
    aff = [_t(n, C, itemsize=a) for n in (("weight", "bias") if affine else ())]
    stats = [_t(n, N, itemsize=f) for n in (("rstd",) if rms else ("mean", "rstd"))] if norm else []
    if phase == "fwd":
        reads = [_t(x_name, N, C, itemsize=a)] + ([_t("residual", N, C, itemsize=a)] if residual else [])
        writes = ([_t("r", N, C, itemsize=a)] if residual else []) + ([_t("out", N, C, itemsize=a)] if norm else [])
        return OpCost(name, "fwd", "memory", 0.0, tuple(reads + mod + index + aff), tuple(writes + stats))
    reads = [_t("dout", N, C, itemsize=a)] if norm else []
    if residual:
        # dr: the gradient reaching r from the ops after it; r (as stored) is normalized
        # again, so the backward reads r, not residual; y for dgate.
        reads += [_t("dr", N, C, itemsize=a), _t("r", N, C, itemsize=a)] if norm else [_t("dr", N, C, itemsize=a)]
        if gate:
            reads.append(_t("y", N, C, itemsize=a))
    else:
        reads.append(_t("x", N, C, itemsize=a))
    reads += [m for m in mod if m.name != "shift"] + index + [t for t in aff if t.name == "weight"] + stats
    writes = [_t("d" + x_name, N, C, itemsize=a)]
    if residual and norm:  # dresidual = dr + (the norm's gradient): a new tensor
        writes.append(_t("dresidual", N, C, itemsize=a))
    writes += [_t("d" + m.name, groups, C, itemsize=a) for m in mod] + [_t("d" + t.name, C, itemsize=a) for t in aff]
    return OpCost(name, "bwd", "memory", 0.0, tuple(reads), tuple(writes))


def qk_norm_rope_cost(name: str, N: int, heads: int, head_dim: int, *, phase: str, itemsize: int = 2, k: bool = True) -> OpCost:
    """:func:`mugv_kernels.qk_norm_rope3d`: RMSNorm + 3D RoPE of q (and k) ``[N, H, D]``;
    int32 positions ``[N, 3]`` and ``[D]`` weights. Statistics are recomputed in the
    backward (nothing saved)."""
    names = ("q", "k") if k else ("q",)
    x = [_t(n, N, heads, head_dim, itemsize=itemsize) for n in names]
    w = [_t(f"{n}_weight", head_dim, itemsize=itemsize) for n in names]
    pos = _t("positions", N, 3, itemsize=INT32)
    out = [_t(f"{n}_out", N, heads, head_dim, itemsize=itemsize) for n in names]
    if phase == "fwd":
        return OpCost(name, "fwd", "memory", 0.0, (*x, pos, *w), tuple(out))
    dout = [_t(f"d{n}_out", N, heads, head_dim, itemsize=itemsize) for n in names]
    dx = [_t(f"d{n}", N, heads, head_dim, itemsize=itemsize) for n in names]
    dw = [_t(f"d{n}_weight", head_dim, itemsize=itemsize) for n in names]
    return OpCost(name, "bwd", "memory", 0.0, (*dout, *x, pos, *w), (*dx, *dw))


def gelu_cost(name: str, numel: int, *, phase: str, itemsize: int = 2) -> OpCost:
    """Element-wise tanh-GELU (forward reads x, writes y; backward reads dy and x, writes dx)."""
    x = _t("x", numel, itemsize=itemsize)
    if phase == "fwd":
        return OpCost(name, "fwd", "memory", 0.0, (x,), (_t("y", numel, itemsize=itemsize),))
    return OpCost(name, "bwd", "memory", 0.0, (_t("dy", numel, itemsize=itemsize), x), (_t("dx", numel, itemsize=itemsize),))


def group_norm_silu_cost(
    name: str, B: int, C: int, spatial: int, groups: int, *, phase: str, itemsize: int = 2, affine: bool = True
) -> OpCost:
    """:func:`mugv_kernels.group_norm_silu` on ``x [B, C, *spatial]`` (``spatial`` = the
    product of the spatial sizes); fp32 mean and rstd ``[B, groups]`` saved."""
    x = _t("x", B, C, spatial, itemsize=itemsize)
    aff = tuple(_t(n, C, itemsize=itemsize) for n in (("weight", "bias") if affine else ()))
    stats = (_t("mean", B, groups, itemsize=FP32), _t("rstd", B, groups, itemsize=FP32))
    if phase == "fwd":
        return OpCost(name, "fwd", "memory", 0.0, (x, *aff), (_t("y", B, C, spatial, itemsize=itemsize), *stats))
    dy, dx = _t("dy", B, C, spatial, itemsize=itemsize), _t("dx", B, C, spatial, itemsize=itemsize)
    daff = tuple(_t("d" + t.name, C, itemsize=itemsize) for t in aff)
    return OpCost(name, "bwd", "memory", 0.0, (dy, x, *aff, *stats), (dx, *daff))


def causal_conv3d_cost(
    name: str,
    B: int,
    C_in: int,
    T: int,
    H: int,
    W: int,
    C_out: int,
    kernel: tuple[int, int, int] = (3, 3, 3),
    *,
    phase: str,
    itemsize: int = 2,
    bias: bool = True,
) -> OpCost:
    """:func:`mugv_kernels.causal_conv3d` at stride 1 (output ``[B, C_out, T, H, W]``):
    ``2 B T H W C_out C_in kT kH kW`` FLOPs forward, twice that backward (dx and dweight);
    the padding is fused, so the padded input is never written."""
    taps = math.prod(kernel)
    fl = 2.0 * B * T * H * W * C_out * C_in * taps
    x, y = _t("x", B, C_in, T, H, W, itemsize=itemsize), _t("y", B, C_out, T, H, W, itemsize=itemsize)
    w = _t("weight", C_out, C_in, *kernel, itemsize=itemsize)
    b = (_t("bias", C_out, itemsize=itemsize),) if bias else ()
    if phase == "fwd":
        return OpCost(name, "fwd", "gemm", fl, (x, w, *b), (y,))
    dy, dx, dw = _t("dy", *y.shape, itemsize=itemsize), _t("dx", *x.shape, itemsize=itemsize), _t("dweight", *w.shape, itemsize=itemsize)
    db = (_t("dbias", C_out, itemsize=itemsize),) if bias else ()
    return OpCost(name, "bwd", "gemm", 2.0 * fl, (dy, x, w), (dx, dw, *db))


# ----------------------------------------------------------------------------------------
# The DiT block
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockDims:
    """Sizes of one DiT block's work.

    Attributes:
        hidden: width ``C``; heads, head_dim: ``H``, ``D`` with ``H * D = C``.
        mlp_hidden: MLP hidden width (``4 C`` in MUG-V).
        seqlens: video tokens of each packed clip (start/end tokens included).
        text_seqlens: caption tokens of each clip (same length as ``seqlens``).
        groups: modulation sets per clip chosen per token (2: timestep and ``t0``).
        itemsize: activation bytes per element (2: bf16).
    """

    hidden: int
    heads: int
    head_dim: int
    mlp_hidden: int
    seqlens: tuple[int, ...]
    text_seqlens: tuple[int, ...]
    groups: int = 2
    itemsize: int = 2

    def __post_init__(self):
        if self.heads * self.head_dim != self.hidden:
            raise ValueError(f"heads * head_dim must equal hidden, got {self.heads} * {self.head_dim} != {self.hidden}")
        if len(self.seqlens) != len(self.text_seqlens) or not self.seqlens:
            raise ValueError("seqlens and text_seqlens must be non-empty and of the same length")


def block_dims(flavor: str, tokens: Sequence[int], text_tokens: Sequence[int] | int = 120, *, itemsize: int = 2) -> BlockDims:
    """:class:`BlockDims` of a named DiT flavor (``mugv.models.FLAVORS``) for clips of
    ``tokens`` tokens each, with ``text_tokens`` caption tokens per clip."""
    from mugv.models import DiTConfig

    cfg = DiTConfig.from_flavor(flavor)
    tokens = tuple(int(t) for t in tokens)
    text = (int(text_tokens),) * len(tokens) if isinstance(text_tokens, int) else tuple(int(t) for t in text_tokens)
    return BlockDims(cfg.hidden_size, cfg.num_heads, cfg.head_dim, int(cfg.hidden_size * cfg.mlp_ratio), tokens, text,
                     itemsize=itemsize)  # fmt: skip


def block_ops(dims: BlockDims, *, phases: Sequence[str] = ("fwd", "bwd")) -> list[OpCost]:
    """Every op of one ``MUGDiTBlock`` on the kernel path, in execution order for the
    forward and in reverse for the backward."""
    N, L, C, H, D, M, a = sum(dims.seqlens), sum(dims.text_seqlens), dims.hidden, dims.heads, dims.head_dim, dims.mlp_hidden, dims.itemsize
    G = dims.groups

    def ops(phase: str) -> list[OpCost]:
        return [
            norm_cost("adaln_msa", N, C, phase=phase, groups=G, itemsize=a),
            linear_cost("qkv", N, C, 3 * C, phase=phase, itemsize=a),
            qk_norm_rope_cost("qk_norm_rope", N, H, D, phase=phase, itemsize=a),
            varlen_attention_cost("self_attn", dims.seqlens, dims.seqlens, H, D, phase=phase, itemsize=a),
            linear_cost("attn_proj", N, C, C, phase=phase, itemsize=a),
            norm_cost("gated_residual_cross_norm", N, C, phase=phase, groups=G, residual=True, gate=True,
                      modulation=False, affine=True, itemsize=a),  # fmt: skip
            linear_cost("cross_q", N, C, C, phase=phase, itemsize=a),
            linear_cost("cross_kv", L, C, 2 * C, phase=phase, itemsize=a),
            norm_cost("cross_q_norm", N * H, D, phase=phase, modulation=False, affine=False, rms=True, itemsize=a),
            norm_cost("cross_k_norm", L * H, D, phase=phase, modulation=False, affine=False, rms=True, itemsize=a),
            varlen_attention_cost("cross_attn", dims.seqlens, dims.text_seqlens, H, D, phase=phase, itemsize=a),
            linear_cost("cross_proj", N, C, C, phase=phase, itemsize=a),
            norm_cost("residual_adaln_mlp", N, C, phase=phase, groups=G, residual=True, itemsize=a),
            linear_cost("fc1", N, C, M, phase=phase, itemsize=a),
            gelu_cost("gelu", N * M, phase=phase, itemsize=a),
            linear_cost("fc2", N, M, C, phase=phase, itemsize=a),
            norm_cost("gated_residual_mlp", N, C, phase=phase, groups=G, residual=True, gate=True, norm=False, itemsize=a),
        ]

    out: list[OpCost] = []
    for phase in phases:
        if phase not in ("fwd", "bwd"):
            raise ValueError(f"phases must be 'fwd' and/or 'bwd', got {phase!r}")
        out += ops(phase) if phase == "fwd" else ops(phase)[::-1]
    return out



@dataclass
class Totals:
    """Totals of a list of :class:`OpCost` at one device's peaks (all modelled).

    Attributes:
        flops_fwd, flops_bwd: model FLOPs of each phase.
        bytes: minimum HBM bytes of all ops.
        attention_flop_share: attention's fraction of all FLOPs.
        time_lower_bound_s: sum of the ops' lower-bound times (ops do not overlap).
        compute_time_s: the time at the compute roof alone (FLOPs / peak).
        mfu_ceiling: ``compute_time_s / time_lower_bound_s``, the highest MFU the ops allow.
        memory_bound_time_s: the part of the lower bound spent in memory-bound ops.
    """

    flops_fwd: float
    flops_bwd: float
    bytes: float
    attention_flop_share: float
    time_lower_bound_s: float
    compute_time_s: float
    mfu_ceiling: float
    memory_bound_time_s: float
    extra: dict = field(default_factory=dict)


def totals(ops: Sequence[OpCost], peaks: DevicePeaks) -> Totals:
    """Sum ``ops`` at ``peaks``."""
    fl = sum(o.flops for o in ops)
    attn = sum(o.flops for o in ops if o.kind == "attention")
    t = sum(o.time_s(peaks) for o in ops)
    mem_t = sum(o.time_s(peaks) for o in ops if o.bound(peaks) == "memory")
    compute_t = fl / peaks.bf16_flops
    return Totals(
        flops_fwd=sum(o.flops for o in ops if o.phase == "fwd"),
        flops_bwd=sum(o.flops for o in ops if o.phase == "bwd"),
        bytes=float(sum(o.bytes for o in ops)),
        attention_flop_share=attn / fl if fl else 0.0,
        time_lower_bound_s=t,
        compute_time_s=compute_t,
        mfu_ceiling=compute_t / t if t else 0.0,
        memory_bound_time_s=mem_t,
    )


def table(ops: Sequence[OpCost], peaks: DevicePeaks, *, depth: int | None = None) -> str:
    """A Markdown table of ``ops`` at ``peaks`` with the totals under it (modelled)."""
    rows = [
        "| op | phase | kind | GFLOP | min MB | FLOP/B | bound | lower bound (us) |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for o in ops:
        ai = "inf" if math.isinf(o.intensity) else f"{o.intensity:.1f}"
        rows.append(
            f"| {o.name} | {o.phase} | {o.kind} | {o.flops / 1e9:.1f} | {o.bytes / 1e6:.1f} | {ai} | "
            f"{o.bound(peaks)} | {o.time_s(peaks) * 1e6:.1f} |"
        )
    tot = totals(ops, peaks)
    rows += [
        "",
        f"Modelled at {peaks.name} peaks ({peaks.hbm_bytes_per_s / 1e12:.2f} TB/s, "
        f"{peaks.bf16_flops / 1e12:.0f} TFLOP/s bf16 dense; source: {peaks.source}).",
        f"- block FLOPs: forward {tot.flops_fwd / 1e12:.2f} TFLOP, backward {tot.flops_bwd / 1e12:.2f} TFLOP; "
        f"attention's share {100 * tot.attention_flop_share:.1f}%",
        f"- block minimum HBM traffic: {tot.bytes / 1e9:.2f} GB",
        f"- block step-time lower bound (fwd+bwd): {tot.time_lower_bound_s * 1e3:.2f} ms "
        f"({tot.memory_bound_time_s * 1e3:.2f} ms of it in memory-bound ops)",
        f"- MFU ceiling: {100 * tot.mfu_ceiling:.1f}%",
    ]
    if depth:
        rows.append(
            f"- {depth} blocks: {depth * (tot.flops_fwd + tot.flops_bwd) / 1e15:.2f} PFLOP, step-time lower bound "
            f"{depth * tot.time_lower_bound_s:.3f} s (blocks only; embedders and final layer not counted)"
        )
    return "\n".join(rows)


def _peaks(gpu: str | None) -> DevicePeaks:
    if gpu is not None:
        return GPU_PEAKS[gpu]
    here = device_peaks()
    if here is None:
        raise SystemExit("no CUDA device with known peaks here: pass --gpu h100|h200|a100|b200")
    return here


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mugv.perf``: print the roofline table (Markdown, or JSON with ``--json``)."""
    p = argparse.ArgumentParser(prog="python -m mugv.perf", description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="10b", help="DiT flavor (default: 10b)")
    p.add_argument("--tokens", default="36002", help="tokens of each packed clip, comma-separated (default: 36002)")
    p.add_argument("--text-tokens", type=int, default=120, help="caption tokens per clip (default: 120)")
    p.add_argument("--gpu", choices=sorted(GPU_PEAKS), default=None,
                   help="model this GPU's datasheet peaks (default: the GPU at hand)")  # fmt: skip
    p.add_argument("--phases", default="fwd,bwd", help="fwd, bwd or fwd,bwd (default)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = p.parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        p.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    from mugv.models import DiTConfig

    depth = DiTConfig.from_flavor(args.flavor).depth
    dims = block_dims(args.flavor, tokens, args.text_tokens)
    ops = block_ops(dims, phases=args.phases.split(","))
    peaks = _peaks(args.gpu)
    if args.json:
        rows = [
            {"name": o.name, "phase": o.phase, "kind": o.kind, "flops": o.flops, "bytes": o.bytes,
             "intensity": None if math.isinf(o.intensity) else o.intensity, "bound": o.bound(peaks),
             "time_lower_bound_s": o.time_s(peaks)}
            for o in ops
        ]  # fmt: skip
        json.dump({"modelled": True, "peaks": asdict(peaks), "dims": asdict(dims), "depth": depth, "ops": rows,
                   "totals": asdict(totals(ops, peaks))}, sys.stdout, indent=1)  # fmt: skip
        print()
    else:
        print(f"Roofline of one {args.flavor} DiT block at tokens={tokens}, text={args.text_tokens} (modelled)\n")
        print(table(ops, peaks, depth=depth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
