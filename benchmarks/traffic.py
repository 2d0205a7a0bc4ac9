"""Bytes each Triton kernel moves, counted under the interpreter, against the roofline's minimum.

``TRITON_INTERPRET=1 python -m benchmarks.traffic [LABEL ...]`` runs every fused op (or the
labelled ones) once at a small
shape with :func:`mugv_kernels.testing.count_traffic` and prints, per op and kernel, the
bytes at distinct addresses loaded and stored in each launch next to the minimum bytes
of :mod:`mugv.perf` for that op (``ratio`` = counted / minimum). Reads and writes of fp32
reduction scratch (the per-program partial buffers, arguments named ``*_P``, summed
afterwards by PyTorch) are listed apart: their size does not grow with the tokens, so
they vanish at model shapes and dominate at test shapes.

``tests/stack/test_perf.py`` asserts on the same cases: no launch reads more than its op
must, each forward reads exactly its minimum, and each op makes the number of passes over
its input that :data:`PASSES` states.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

BF16 = torch.bfloat16


@dataclass
class TrafficRow:
    """One op's counted traffic against its minimum (bytes)."""

    op: str
    kernels: list[str]
    loads: int  # unique loaded bytes, summed over launches, scratch excluded
    stores: int
    scratch: int
    min_reads: int
    min_writes: int
    per_launch_loads: list[int]
    stats: int = 0  # fp32 statistics the op writes (a later launch of a multi-pass op reads them)

    @property
    def load_ratio(self) -> float:
        return self.loads / self.min_reads

    @property
    def store_ratio(self) -> float:
        return self.stores / self.min_writes


PASSES: dict[str, int] = {"group_norm_silu fwd": 2}
"""Ops that read their input in more than one launch, and how many: GroupNorm+SiLU's
statistics pass then its apply pass (a group is too large for one program's registers)."""

KNOWN_EXTRA_STORES: dict[str, str] = {
    "gated_residual bwd": "writes dresidual, a copy of dr (the minimum aliases it)",
}
"""Ops that write more than the minimum, and why (reported, not failed)."""


def _is_scratch(name: str) -> bool:
    return name.upper().endswith("_P")


def cases() -> dict[str, Callable[[], tuple]]:
    """op label -> a thunk that runs the op (under :func:`count_traffic`) and returns its
    :class:`mugv.perf.OpCost`; the launches are those made while the thunk runs."""
    import mugv_kernels as mk
    from mugv import perf

    N, C, G = 33, 64, 2

    def mods():
        return [torch.randn(1, G, C, dtype=BF16, requires_grad=True) for _ in range(3)]

    idx = (torch.arange(N) % 3 == 0).int()[None]

    def adaln(phase):
        x = torch.randn(1, N, C, dtype=BF16, requires_grad=True)
        _, sh, sc = mods()
        cost = perf.norm_cost("adaln", N, C, phase=phase, groups=G)
        if phase == "fwd":
            return lambda: (mk.ada_layer_norm(x, sh, sc, index=idx), cost)[1]
        o = mk.ada_layer_norm(x, sh, sc, index=idx)
        return lambda: (o.backward(torch.randn_like(o)), cost)[1]

    def chain(phase):
        x, res = (torch.randn(1, N, C, dtype=BF16, requires_grad=True) for _ in range(2))
        g, sh, sc = mods()
        cost = perf.norm_cost("chain", N, C, phase=phase, groups=G, residual=True, gate=True)
        if phase == "fwd":
            return lambda: (mk.gated_residual_ada_layer_norm(res, x, g, sh, sc, index=idx), cost)[1]
        r, o = mk.gated_residual_ada_layer_norm(res, x, g, sh, sc, index=idx)
        return lambda: (torch.autograd.backward((r, o), (torch.randn_like(r), torch.randn_like(o))), cost)[1]

    def gres(phase):
        x, res = (torch.randn(1, N, C, dtype=BF16, requires_grad=True) for _ in range(2))
        g = mods()[0]
        cost = perf.norm_cost("gres", N, C, phase=phase, groups=G, residual=True, gate=True, norm=False)
        if phase == "fwd":
            return lambda: (mk.gated_residual(res, x, g, index=idx), cost)[1]
        r = mk.gated_residual(res, x, g, index=idx)
        return lambda: (r.backward(torch.randn_like(r)), cost)[1]

    def rope(phase):
        H, D = 3, 72
        pos = mk.video_positions(1, 2, 3)
        n = pos.shape[0]
        qkv = torch.randn(1, n, 3, H, D, dtype=BF16)
        q, k = qkv[:, :, 0].detach().requires_grad_(), qkv[:, :, 1].detach().requires_grad_()
        qw, kw = (torch.ones(D, dtype=BF16, requires_grad=True) for _ in range(2))
        cost = perf.qk_norm_rope_cost("rope", n, H, D, phase=phase)
        if phase == "fwd":
            return lambda: (mk.qk_norm_rope3d(q, k, pos, (24, 24, 24), q_weight=qw, k_weight=kw), cost)[1]
        qo, ko = mk.qk_norm_rope3d(q, k, pos, (24, 24, 24), q_weight=qw, k_weight=kw)
        return lambda: (torch.autograd.backward((qo, ko), (torch.randn_like(qo), torch.randn_like(ko))), cost)[1]

    def gn():
        x = torch.randn(1, 8, 3, 6, 5, dtype=BF16)
        w, b = torch.rand(8, dtype=BF16) + 0.5, torch.randn(8, dtype=BF16)
        return lambda: (mk.group_norm_silu(x, 4, w, b), perf.group_norm_silu_cost("gn", 1, 8, 90, 4, phase="fwd"))[1]

    def conv():
        x, w, b = torch.randn(1, 4, 3, 5, 6, dtype=BF16), torch.randn(8, 4, 3, 3, 3, dtype=BF16), torch.randn(8, dtype=BF16)
        return lambda: (mk.causal_conv3d(x, w, b), perf.causal_conv3d_cost("conv", 1, 4, 3, 5, 6, 8, phase="fwd"))[1]

    def attn():
        lens, H, D = [5, 9], 2, 72
        q, k, v = (torch.randn(sum(lens), H, D, dtype=BF16) for _ in range(3))
        cu = torch.tensor([0, 5, 14], dtype=torch.int32)
        cost = perf.varlen_attention_cost("attn", lens, lens, H, D, phase="fwd")
        return lambda: (mk.varlen_attention(q, k, v, cu, cu, 9, 9, backend="triton"), cost)[1]

    return {
        "ada_layer_norm fwd": lambda: adaln("fwd"),
        "ada_layer_norm bwd": lambda: adaln("bwd"),
        "gated_residual_ada_layer_norm fwd": lambda: chain("fwd"),
        "gated_residual_ada_layer_norm bwd": lambda: chain("bwd"),
        "gated_residual fwd": lambda: gres("fwd"),
        "gated_residual bwd": lambda: gres("bwd"),
        "qk_norm_rope3d fwd": lambda: rope("fwd"),
        "qk_norm_rope3d bwd": lambda: rope("bwd"),
        "group_norm_silu fwd": gn,
        "causal_conv3d fwd": conv,
        "varlen_attention fwd": attn,
    }


def measure(label: str, make: Callable[[], Callable[[], object]]) -> TrafficRow:
    """Run one case under :func:`count_traffic` and sum its launches."""
    from mugv_kernels.testing import count_traffic

    thunk = make()  # setup (forward of a backward case) runs outside the count
    with count_traffic() as launches:
        cost = thunk()
    loads = stores = scratch = 0
    per_launch = []
    for launch in launches:
        ld = sum(a.unique_loaded for a in launch.args.values() if not _is_scratch(a.name)) + launch.other.unique_loaded
        st = sum(a.unique_stored for a in launch.args.values() if not _is_scratch(a.name)) + launch.other.unique_stored
        scratch += sum(a.unique_loaded + a.unique_stored for a in launch.args.values() if _is_scratch(a.name))
        loads, stores = loads + ld, stores + st
        per_launch.append(ld)
    stats = sum(t.nbytes for t in cost.writes if t.itemsize == 4)
    kernels = [launch.kernel for launch in launches]
    return TrafficRow(label, kernels, loads, stores, scratch, cost.read_bytes, cost.write_bytes, per_launch, stats)


def report(rows: list[TrafficRow]) -> str:
    """Markdown table of :func:`measure` rows."""
    out = [
        "| op | kernels | loaded B | min read B | load ratio | stored B | min write B | store ratio | scratch B |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        out.append(
            f"| {r.op} | {', '.join(r.kernels)} | {r.loads} | {r.min_reads} | {r.load_ratio:.3f} | {r.stores} | "
            f"{r.min_writes} | {r.store_ratio:.3f} | {r.scratch} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    labels = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        print("run with TRITON_INTERPRET=1 (the counts come from Triton's interpreter)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    all_cases = cases()
    unknown = [label for label in labels if label not in all_cases]
    if unknown:
        print(f"unknown cases {unknown}; known: {list(all_cases)}", file=sys.stderr)
        return 2
    rows = [measure(label, make) for label, make in all_cases.items() if not labels or label in labels]
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
