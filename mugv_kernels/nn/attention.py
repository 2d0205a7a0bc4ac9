"""Attention modules over packed variable-length sequences (:func:`mugv_kernels.varlen_attention`).

* :class:`VarlenAttention`: no parameters, the core op on already-projected
  ``q [Tq, H, D]``, ``k/v [Tk, H, D]``.
* :class:`VarlenSelfAttention`: fused QKV projection, optional per-head RMSNorm on Q and
  K, an optional rotary hook, attention within each packed clip, output projection.
* :class:`VarlenCrossAttention`: queries from the packed clips, keys/values from their
  packed captions, clip ``b`` attending to caption ``b`` only.

Parameter names follow MUG-V's public ``mug_v/dit/module.py`` (``Attention``:
``qkv``/``q_norm``/``k_norm``/``proj``; ``CrossAttention``: ``q_linear``/``kv_linear``/
``q_norm``/``k_norm``/``proj``), so its state dicts load; MUG-V pads text and runs
xformers' block-diagonal mask, these run on packed tokens with ``cu_seqlens``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mugv_kernels.ops.varlen_attention import BACKENDS, varlen_attention

__all__ = ["VarlenAttention", "VarlenCrossAttention", "VarlenSelfAttention"]

Rotary = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``rotary(q, k) -> (q, k)`` on ``[T, H, D]`` tensors (e.g. 3D RoPE at packed positions)."""


def _check_backend(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


class VarlenAttention(nn.Module):
    """Attention within packed segments, on projected q, k, v (no parameters).

    Args:
        scale: multiplies ``q k^T``; default ``1 / sqrt(D)``.
        backend: ``"auto"`` or a backend name (see :func:`mugv_kernels.varlen_attention`).
        validate: check the offsets' values on the host in eager mode (one sync per call;
            pass False when the caller built them, e.g. with :func:`mugv_kernels.pack`).

    Shapes:
        ``forward(q [Tq, H, D], k [Tk, H, D], v [Tk, H, D], cu_seqlens_q [B + 1],
        cu_seqlens_k [B + 1], max_seqlen_q: int, max_seqlen_k: int)`` returns
        ``[Tq, H, D]`` in ``q.dtype``.

    Raises:
        ValueError: an unknown backend (at construction); everything
            :func:`mugv_kernels.varlen_attention` raises (at call).
    """

    def __init__(self, *, scale: float | None = None, backend: str = "auto", validate: bool = True):
        super().__init__()
        self.scale, self.backend, self.validate = scale, _check_backend(backend), validate

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
    ) -> Tensor:
        return varlen_attention(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            scale=self.scale,
            backend=self.backend,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return f"scale={self.scale}, backend={self.backend!r}, validate={self.validate}"


def _qk_norm(head_dim: int, qk_norm: bool, eps: float) -> nn.Module:
    return nn.RMSNorm(head_dim, eps=eps) if qk_norm else nn.Identity()


class VarlenSelfAttention(nn.Module):
    """Multi-head self-attention over packed sequences (each sequence attends to itself).

    ``q, k, v = split(qkv(x))`` -> per-head ``q_norm``/``k_norm`` (RMSNorm, learned
    weight) -> ``rotary(q, k)`` if given -> :func:`~mugv_kernels.varlen_attention` ->
    ``proj``. MUG-V's DiT self-attention (arXiv 2510.17519 Sec. 3; public
    ``mug_v/dit/module.py:Attention``) with ``qkv_bias=True, qk_norm=True``, made
    padding-free.

    Args:
        dim: model width C (= heads * head_dim).
        num_heads: H; must divide ``dim``.
        qkv_bias: bias of the fused QKV projection (default True, as MUG-V).
        qk_norm: RMSNorm over head_dim on Q and K (default True, as MUG-V).
        eps: the RMSNorm epsilon (default 1e-6).
        backend: ``"auto"`` or a backend name (see :func:`mugv_kernels.varlen_attention`).
        validate: host-side check of the offsets in eager mode (see :class:`VarlenAttention`).

    Shapes:
        ``forward(x [T, C], cu_seqlens [B + 1], max_seqlen: int, rotary=None)`` returns
        ``[T, C]`` in ``x.dtype``; ``rotary(q, k)`` gets and returns ``[T, H, D]``.

    Raises:
        ValueError: ``num_heads`` does not divide ``dim``, or an unknown backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        qkv_bias: bool = True,
        qk_norm: bool = True,
        eps: float = 1e-6,
        backend: str = "auto",
        validate: bool = True,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(self.head_dim, qk_norm, eps)
        self.k_norm = _qk_norm(self.head_dim, qk_norm, eps)
        self.attn = VarlenAttention(backend=backend, validate=validate)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, rotary: Rotary | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [T, {self.dim}] (packed tokens), got {tuple(x.shape)}")
        T = x.shape[0]
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        if rotary is not None:
            q, k = rotary(q, k)
        out = self.attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
        return self.proj(out.reshape(T, self.dim))


class VarlenCrossAttention(nn.Module):
    """Multi-head cross-attention: packed queries attend to their own packed context.

    ``q = q_linear(x)``, ``k, v = split(kv_linear(context))`` -> per-head RMSNorm on Q
    and K -> :func:`~mugv_kernels.varlen_attention` with the clips' and the captions'
    offsets -> ``proj``. MUG-V's caption cross-attention (public
    ``mug_v/dit/module.py:CrossAttention``, which uses xformers' ``BlockDiagonalMask``);
    captions of zero tokens give zero output rows.

    Args:
        dim: query width C (= heads * head_dim).
        num_heads: H; must divide ``dim``.
        context_dim: width of the context tokens (default ``dim``).
        qkv_bias: biases of ``q_linear`` and ``kv_linear`` (default True, as MUG-V).
        qk_norm: RMSNorm over head_dim on Q and K (default True).
        eps: the RMSNorm epsilon (default 1e-6).
        backend: ``"auto"`` or a backend name.
        validate: host-side check of the offsets in eager mode (see :class:`VarlenAttention`).

    Shapes:
        ``forward(x [Tq, C], context [Tk, C_ctx], cu_seqlens_q [B + 1],
        cu_seqlens_k [B + 1], max_seqlen_q: int, max_seqlen_k: int)`` returns
        ``[Tq, C]`` in ``x.dtype``.

    Raises:
        ValueError: ``num_heads`` does not divide ``dim``, an unknown backend, or inputs
            of the wrong width.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        qk_norm: bool = True,
        eps: float = 1e-6,
        backend: str = "auto",
        validate: bool = True,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.context_dim = dim if context_dim is None else context_dim
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(self.context_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = _qk_norm(self.head_dim, qk_norm, eps)
        self.k_norm = _qk_norm(self.head_dim, qk_norm, eps)
        self.attn = VarlenAttention(backend=backend, validate=validate)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor,
        cu_seqlens_q: Tensor,
        cu_seqlens_k: Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
    ) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [Tq, {self.dim}] (packed tokens), got {tuple(x.shape)}")
        if context.dim() != 2 or context.shape[1] != self.context_dim:
            raise ValueError(f"context must be [Tk, {self.context_dim}] (packed tokens), got {tuple(context.shape)}")
        Tq, Tk = x.shape[0], context.shape[0]
        q = self.q_norm(self.q_linear(x).view(Tq, self.num_heads, self.head_dim))
        k, v = self.kv_linear(context).view(Tk, 2, self.num_heads, self.head_dim).unbind(1)
        k = self.k_norm(k)
        out = self.attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return self.proj(out.reshape(Tq, self.dim))
