"""The roofline model (:mod:`mugv.perf`): FLOPs against ``FlopCounterMode`` of the real
block on the meta device, bytes against sizes written out by hand, the totals, the CLI;
and the bytes each Triton kernel moves under the interpreter against the model's minimum."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mugv import perf
from mugv_kernels.device import GPU_PEAKS, DevicePeaks


def _meta_block_flops(dims: perf.BlockDims) -> tuple[float, float]:
    """(forward, backward) FLOPs of one ``MUGDiTBlock`` (reference backend) counted by
    ``FlopCounterMode`` on the meta device. ``mugv_kernels.varlen_attention`` reads its
    offsets on the host, which meta tensors do not have, so attention is per-clip SDPA here
    over the same segments (the test's own oracle of it)."""
    import torch.nn.functional as F

    from mugv.models.dit_layers import MUGDiTBlock, PackedBatch

    C, N, L, n = dims.hidden, sum(dims.seqlens), sum(dims.text_seqlens), len(dims.seqlens)

    class _MetaBatch(PackedBatch):
        def attention(self, q, k, v, cross, scale):
            lens_k = dims.text_seqlens if cross else dims.seqlens
            outs = [
                F.scaled_dot_product_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), scale=scale)
                .transpose(0, 1)
                for qi, ki, vi in zip(q.split(list(dims.seqlens)), k.split(list(lens_k)), v.split(list(lens_k)))
            ]  # fmt: skip
            return torch.cat(outs)

    def cu(lens):
        return torch.zeros(len(lens) + 1, dtype=torch.int32)

    with torch.device("meta"):
        block = MUGDiTBlock(C, dims.heads, dims.mlp_hidden / C, (dims.head_dim // 3,) * 3, 1e4)
        x = torch.randn(1, N, C, requires_grad=True)
        batch = _MetaBatch(
            t_mlp=torch.randn(2 * n, 6 * C), index=torch.zeros(1, N, dtype=torch.int32),
            positions=torch.zeros(N, 3, dtype=torch.int32), cu_seqlens=cu(dims.seqlens), max_seqlen=max(dims.seqlens),
            text=torch.randn(L, C, requires_grad=True), text_cu_seqlens=cu(dims.text_seqlens),
            text_max_seqlen=max(dims.text_seqlens), backend="reference",
        )  # fmt: skip
        with FlopCounterMode(display=False) as fwd:
            out = block(x, batch)
        with FlopCounterMode(display=False) as bwd:
            out.sum().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize(
    "flavor, tokens, text",
    [("10b", (36002,), (120,)), ("1b", (12882, 4502, 1), (77, 300, 1)), ("tiny", (7,), (3,))],
    ids=["10b-36002", "1b-mixed", "tiny"],
)
def test_flops_match_flop_counter_on_meta(flavor, tokens, text):
    dims = perf.block_dims(flavor, tokens, text)
    ops = perf.block_ops(dims)
    want_fwd, want_bwd = _meta_block_flops(dims)
    got_fwd = sum(o.flops for o in ops if o.phase == "fwd")
    got_bwd = sum(o.flops for o in ops if o.phase == "bwd")
    assert got_fwd == pytest.approx(want_fwd, rel=1e-9)
    assert got_bwd == pytest.approx(want_bwd, rel=1e-9)


def test_bytes_from_tensor_sizes():
    M, K, N = 5, 7, 3
    fwd = perf.linear_cost("l", M, K, N, phase="fwd")
    assert fwd.bytes == 2 * (M * K + N * K + N + M * N)
    bwd = perf.linear_cost("l", M, K, N, phase="bwd", itemsize=4, bias=False)
    assert bwd.read_bytes == 4 * (M * N + M * K + N * K) and bwd.write_bytes == 4 * (M * K + N * K)
    assert bwd.flops == 2 * fwd.flops
    att = perf.varlen_attention_cost("a", [3, 4], [2, 0], 2, 8, phase="fwd")
    assert att.flops == 4 * 2 * 8 * (3 * 2 + 4 * 0)
    assert att.read_bytes == 2 * (7 + 2 + 2) * 2 * 8 + 2 * 4 * 3 and att.write_bytes == 2 * 7 * 2 * 8 + 4 * 2 * 7
    # the adaLN chain forward: residual, y, gate/shift/scale [G, C], int32 index; r, out, fp32 mean/rstd
    ch = perf.norm_cost("c", 10, 6, phase="fwd", groups=2, residual=True, gate=True)
    assert ch.read_bytes == 2 * (2 * 60 + 3 * 12) + 4 * 10 and ch.write_bytes == 2 * 2 * 60 + 2 * 4 * 10
    gn = perf.group_norm_silu_cost("g", 2, 4, 9, 2, phase="bwd", affine=False)
    assert gn.read_bytes == 2 * 2 * 72 + 2 * 4 * 4 and gn.write_bytes == 2 * 72
    with pytest.raises(ValueError, match="one length per segment"):
        perf.varlen_attention_cost("a", [1], [1, 2], 1, 8, phase="fwd")


def test_totals_and_bounds():
    dims = perf.block_dims("10b", [36002], 120)
    ops = perf.block_ops(dims)
    peaks = GPU_PEAKS["h100"]
    tot = perf.totals(ops, peaks)
    N, C, L = 36002, 3456, 120
    attn = 3 * 4.0 * C * (N * N + N * L)  # forward + backward (2x) of self- and cross-attention
    assert tot.attention_flop_share == pytest.approx(attn / (tot.flops_fwd + tot.flops_bwd))
    assert tot.flops_bwd == pytest.approx(2 * tot.flops_fwd)
    assert tot.compute_time_s <= tot.time_lower_bound_s
    assert 0 < tot.mfu_ceiling <= 1
    for o in ops:  # every op under one roof or the other, never faster than either
        assert o.time_s(peaks) >= o.flops / peaks.bf16_flops and o.time_s(peaks) >= o.bytes / peaks.hbm_bytes_per_s
        assert o.bound(peaks) == ("memory" if o.kind == "memory" else o.bound(peaks))
    slow = DevicePeaks("x", peaks.hbm_bytes_per_s / 10, peaks.bf16_flops)
    assert perf.totals(ops, slow).mfu_ceiling < tot.mfu_ceiling
    with pytest.raises(ValueError, match="phases"):
        perf.block_ops(dims, phases=["forward"])
    with pytest.raises(ValueError, match="head_dim"):
        perf.BlockDims(10, 3, 3, 40, (1,), (1,))


def test_cli_markdown_and_json(capsys):
    assert perf.main(["--flavor", "10b", "--tokens", "36002", "--gpu", "h200"]) == 0
    text = capsys.readouterr().out
    assert "modelled" in text.lower() and "MFU ceiling" in text and "H200" in text
    for name in ("adaln_msa", "qkv", "qk_norm_rope", "self_attn", "cross_attn", "fc1", "gelu", "fc2", "gated_residual_mlp"):
        assert f"| {name} | fwd |" in text and f"| {name} | bwd |" in text
    assert perf.main(["--flavor", "tiny", "--tokens", "7,9", "--gpu", "a100", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["modelled"] is True and data["dims"]["seqlens"] == [7, 9] and len(data["ops"]) == 34
    assert math.isclose(data["totals"]["flops_bwd"], 2 * data["totals"]["flops_fwd"])
    with pytest.raises(SystemExit):
        perf.main(["--tokens", "abc", "--gpu", "h100"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--gpu"):
            perf.main(["--tokens", "36002"])


# ------------------------------------------------------------------ kernel traffic (interpreter)

from benchmarks import traffic  # noqa: E402

TRAFFIC_CASES = traffic.cases() if torch.cuda.is_available() is False else {}


@pytest.mark.parametrize("label", list(TRAFFIC_CASES))
def test_kernel_traffic_against_roofline(label):
    """No launch reads more than its op's minimum; forwards read exactly the minimum; ops
    make the number of passes :data:`benchmarks.traffic.PASSES` states; stores never
    exceed the minimum but for the ops listed in ``KNOWN_EXTRA_STORES``."""
    row = traffic.measure(label, TRAFFIC_CASES[label])
    assert row.kernels, "no Triton launch recorded"
    passes = traffic.PASSES.get(label, 1)
    allowed = row.min_reads + (row.stats if passes > 1 else 0)  # a later pass reads the statistics
    for loads in row.per_launch_loads:
        assert loads <= allowed, f"{label}: one launch loads {loads} B, the op needs {row.min_reads} B"
    assert row.loads <= passes * allowed
    if label.endswith("fwd"):
        assert row.load_ratio == pytest.approx(passes, rel=0.05)
        assert row.store_ratio == pytest.approx(1.0, rel=0.01)
    if label not in traffic.KNOWN_EXTRA_STORES:
        assert row.stores <= row.min_writes * 1.01
