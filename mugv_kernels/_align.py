"""Alignment facts the launchers know and Triton's compiler cannot derive.

Triton's JIT marks an integer argument divisible by 16 (``tt.divisibility``), and
nothing finer. A head dim of 72 and the strides built from it (a ``[T, H, 72]`` tensor
has head stride 72) are multiples of 8 elements, so every row of such a tile starts on a
16-byte boundary and moves in 128-bit accesses, but the compiler, seeing "divisibility
1", issues one 16-bit access per element. A launcher computes :func:`common_divisor` of
the sizes and strides a kernel indexes with and passes it as a constexpr ``DIV``; the
kernel rewrites each of them with :func:`multiple` (exact, as ``DIV`` divides them),
from which the compiler's axis analysis proves the alignment and contiguity it needs.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["common_divisor", "multiple"]


def common_divisor(*values: int) -> int:
    """The ``DIV`` hint for ``values`` (sizes and strides, in elements): the largest power
    of two below 16 dividing every value, or 1 when 16 divides them all (the JIT's own
    ``tt.divisibility = 16`` already says so, and a rewrite would only add instructions).

    ``common_divisor(72, 3456, 72) == 8``; ``common_divisor(20, 40) == 4``;
    ``common_divisor(128, 6144) == 1``; zero divides by anything. Raises ``ValueError`` on
    a negative value.
    """
    if any(v < 0 for v in values):
        raise ValueError(f"common_divisor: values must be >= 0, got {values}")
    if all(v % 16 == 0 for v in values):
        return 1
    div = 8
    while div > 1 and any(v % div for v in values):
        div //= 2
    return div


@triton.jit
def multiple(x, DIV: tl.constexpr):
    """``x`` in a form the compiler knows is a multiple of ``DIV``, ``(x // DIV) * DIV``.

    Exact only when ``DIV`` divides ``x``: the launcher guarantees it with
    :func:`common_divisor`. (``tl.multiple_of`` does not attach to a scalar kernel
    argument.) ``DIV = 1`` folds away.
    """
    return (x // DIV) * DIV
