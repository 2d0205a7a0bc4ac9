"""pack / unpack: round trips, offsets, gradients and argument errors."""

import pytest
import torch

import mugv_kernels as mk
from mugv_kernels.ops.packing import check_cu_seqlens


@pytest.mark.parametrize("lengths", [[5, 0, 1, 17], [1], [0], [0, 0, 3], [113, 203]])
@pytest.mark.parametrize("trailing", [(), (3, 8)])
def test_round_trip(lengths, trailing):
    tensors = [torch.randn(n, *trailing) for n in lengths]
    packed, cu, max_seqlen = mk.pack(tensors)
    assert packed.shape == (sum(lengths), *trailing)
    assert cu.dtype == torch.int32 and cu.device == packed.device
    expected_cu = [0]
    for n in lengths:
        expected_cu.append(expected_cu[-1] + n)
    assert cu.tolist() == expected_cu
    assert isinstance(max_seqlen, int) and max_seqlen == max(lengths)
    back = mk.unpack(packed, cu)
    assert len(back) == len(lengths)
    for a, b in zip(back, tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_contiguous_and_int64_offsets():
    base = torch.randn(4, 7, 6)
    tensors = [base[:, i, :] for i in range(3)]  # strided views [4, 6]
    packed, cu, _ = mk.pack(tensors)
    back = mk.unpack(packed, cu.long())
    for a, b in zip(back, tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_flow_through_pack_and_unpack():
    tensors = [torch.randn(n, 4, requires_grad=True) for n in (3, 0, 2)]
    packed, cu, _ = mk.pack(tensors)
    weights = torch.arange(packed.numel(), dtype=torch.float32).view_as(packed)
    pieces = mk.unpack(packed * weights, cu)
    sum(p.sum() for p in pieces).backward()
    start = 0
    for t in tensors:
        n = t.shape[0]
        torch.testing.assert_close(t.grad, weights[start : start + n])
        start += n


@pytest.mark.parametrize(
    "tensors, match",
    [
        ([], "non-empty list"),
        (torch.randn(3, 4), "non-empty list"),
        ([torch.tensor(1.0)], "0-d"),
        ([torch.randn(2, 4), torch.randn(2, 5)], "trailing shape"),
        ([torch.randn(2, 4), torch.empty(2, 4, device="meta")], "is on meta"),
    ],
)
def test_pack_errors(tensors, match):
    with pytest.raises(ValueError, match=match):
        mk.pack(tensors)


@pytest.mark.parametrize(
    "cu, match",
    [
        (torch.tensor([[0, 2, 5]], dtype=torch.int32), "1-D"),
        (torch.tensor([], dtype=torch.int32), "1-D"),
        (torch.tensor([1, 2, 5], dtype=torch.int32), "start at 0"),
        (torch.tensor([0, 3, 2, 5], dtype=torch.int32), "non-decreasing"),
        (torch.tensor([0, 2, 4], dtype=torch.int32), "end at the packed length 5"),
    ],
)
def test_unpack_errors(cu, match):
    with pytest.raises(ValueError, match=match):
        mk.unpack(torch.randn(5, 3), cu)


def test_type_errors():
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a torch.Tensor"):
        mk.pack([torch.randn(2, 4), "x"])
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype torch.float64, expected torch.float32"):
        mk.pack([torch.randn(2, 4), torch.randn(2, 4, dtype=torch.float64)])
    with pytest.raises(TypeError, match="cu_seqlens must have dtype int32/int64, got torch.float32"):
        mk.unpack(torch.randn(5, 3), torch.tensor([0.0, 2.0, 5.0]))
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        mk.unpack(torch.randn(5, 3), [0, 2, 5])


def test_unpack_rejects_scalar():
    with pytest.raises(ValueError, match=r"\[T, \.\.\.\]"):
        mk.unpack(torch.tensor(1.0), torch.tensor([0], dtype=torch.int32))


def test_check_cu_seqlens_skips_values_when_asked():
    bad = torch.tensor([1, 0], dtype=torch.int32)
    assert check_cu_seqlens("cu", bad, 7, check_values=False) is None
    with pytest.raises(ValueError, match="is on meta"):
        check_cu_seqlens("cu", bad.to("meta"), 7, device=torch.device("cpu"))
