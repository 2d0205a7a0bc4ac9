"""The spatial stage of the released MUG-V video VAE: a truncated SDXL image VAE run frame by frame.

The released ``MUGAutoencoderPipeline`` (``mug_v/encoder/vae/vae.py`` of ``Shopee-MUG/MUG-V``)
first maps every frame through an SDXL-shaped ``AutoencoderKL``
(``mug_v/encoder/vae/vae2d/``: ``block_out_channels`` 128/256/512/512, two ResNet layers per
down block and three per up block, 32 GroupNorm groups, eps 1e-6, a single-head attention in
each mid-block) that is **truncated**:

* the encoder stops after its mid-block: ``conv_in -> 4 down blocks (3 stride-2 downsamples)
  -> mid-block`` returns the 512-channel features at 1/8 of the frame size (no
  ``conv_norm_out`` / ``conv_act`` / ``conv_out``, no ``quant_conv``), multiplied by
  ``scaling_factor = 0.18215``;
* the decoder starts at its mid-block: ``features / 0.18215 -> mid-block -> 4 up blocks
  (3 nearest x2 upsamples) -> GroupNorm + SiLU -> conv_out`` to RGB (no ``conv_in``, no
  ``post_quant_conv``).

The layers unused by the truncated forward still exist in the released state dict
(``encoder.conv_norm_out.*``, ``encoder.conv_out.*``, ``decoder.conv_in.*``, as diffusers
builds them): :class:`SpatialVAE` accepts and drops exactly those keys on load, so the
released file loads with ``strict=True`` (listed in :data:`RELEASED_UNUSED_SPATIAL_KEYS`).

The module tree and parameter names are diffusers' (``down_blocks.{i}.resnets.{j}.norm1``,
``mid_block.attentions.0.to_q``, ``up_blocks.{i}.upsamplers.0.conv``, ...). Each GroupNorm
(+SiLU) runs through :func:`mugv_kernels.group_norm_silu` (``kernels=True``: ``backend="auto"``,
the fused Triton op on GPUs; ``kernels=False``: its ``"reference"`` backend), the 2D
convolutions through ``F.conv2d`` (cuDNN), the mid-block attention through
``F.scaled_dot_product_attention``.

Frames run in micro-batches (``frame_batch``, default 4 as the public ``micro_batch_size``), so
memory is bounded by one micro-batch of frames plus the stacked outputs.

**Tiling** (opt-in, :meth:`SpatialVAE.set_tiling`; off by default): each frame larger than a
tile is cut into overlapping square tiles (``tile_size`` pixels, ``overlap`` pixels shared
between neighbours, the tiles spread evenly so the last one ends at the frame's edge), each
tile encoded or decoded on its own, and the results blended: every output pixel is the
weighted mean of the tiles covering it, each tile's weight rising linearly across its
overlap with a neighbour (the linear seam blending of diffusers'
``AutoencoderKL.tiled_encode`` / ``tiled_decode``, our own formulation as a normalized
weighted sum). The working set then follows the tile, not the frame: the largest
intermediates (the decoder's full-resolution 128-channel maps, the mid-block's ``HW x HW``
attention) shrink by ``(frame / tile)`` and its square. **Tiled results depart from the
public pipeline**: each GroupNorm normalizes with one tile's statistics and the mid-block
attention sees one tile's pixels, where the public model uses the whole frame; the departure
is small on smooth content and grows with what differs between tiles. Frames that fit in one
tile take the untiled path, bitwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import mugv_kernels as mk
from mugv.models._backend import set_module_backend

__all__ = [
    "RELEASED_UNUSED_SPATIAL_KEYS",
    "SDXL_SCALING_FACTOR",
    "SpatialAttention",
    "SpatialDecoder",
    "SpatialEncoder",
    "SpatialResnetBlock",
    "SpatialVAE",
    "TruncatedAutoencoderKL",
    "tiled_map",
]

SDXL_SCALING_FACTOR = 0.18215
"""The factor the public ``MUGAutoencoderKL`` multiplies encoder features by (and divides
decoder inputs by); its constructor default, not the SDXL config's 0.13025."""

RELEASED_UNUSED_SPATIAL_KEYS = (
    "encoder.conv_norm_out.weight", "encoder.conv_norm_out.bias",
    "encoder.conv_out.weight", "encoder.conv_out.bias",
    "decoder.conv_in.weight", "decoder.conv_in.bias",
)
"""Keys of the released ``AutoencoderKL`` that the truncated forward never uses (relative to
``spatial_vae.module.``); dropped on load."""


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of the tiles of length ``tile`` covering ``[0, n)`` with at least ``overlap``
    shared between neighbours, spread evenly (the first at 0, the last at ``n - tile``)."""
    if n <= tile:
        return [0]
    count = -(-(n - overlap) // (tile - overlap))  # ceil
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, overlap: int, left: bool, right: bool) -> Tensor:
    """fp32 ``[length]`` blending weights: 1 inside, rising linearly over the first ``overlap``
    samples when there is a neighbour on the left, falling over the last ``overlap`` when on the
    right (``(i + 0.5) / overlap``: never 0, so every pixel keeps a positive total weight)."""
    w = torch.ones(length)
    if overlap > 0:
        up = (torch.arange(overlap, dtype=torch.float32) + 0.5) / overlap
        if left:
            w[:overlap] = torch.minimum(w[:overlap], up)
        if right:
            w[-overlap:] = torch.minimum(w[-overlap:], up.flip(0))
    return w


def tiled_map(fn, x: Tensor, *, tile: int, overlap: int, f_in: int, f_out: int) -> Tensor:
    """Apply ``fn`` to overlapping spatial tiles of ``x [N, C, H, W]`` and blend the outputs.

    Positions are counted on a grid of cells: a cell is ``f_in x f_in`` input pixels and
    ``f_out x f_out`` output pixels (encode: ``f_in = 8, f_out = 1``; decode: ``1, 8``), so
    ``fn`` must map ``[N, C, h f_in, w f_in] -> [N, C', h f_out, w f_out]``. Tiles are
    ``tile`` cells square (clipped to the frame), neighbours share at least ``overlap`` cells
    (see :func:`_tile_starts`); every output pixel is the weighted mean of the tiles covering
    it with the linear ramps of :func:`_ramp` (over ``overlap * f_out`` output pixels), computed
    in fp32 (fp64 for fp64 outputs) and returned in ``fn``'s output dtype. ``fn`` that acts on each cell alone gives
    exactly ``fn(x)``.

    Raises:
        ValueError: ``H`` or ``W`` not a multiple of ``f_in``, ``tile < 1`` or ``overlap`` not
            in ``[0, tile / 2]``.
    """
    N, _, H, W = x.shape
    if H % f_in or W % f_in:
        raise ValueError(f"x height and width must be multiples of {f_in}, got {(H, W)}")
    if tile < 1 or not 0 <= 2 * overlap <= tile:
        raise ValueError(f"need tile >= 1 and 0 <= overlap <= tile / 2, got tile={tile}, overlap={overlap}")
    gh, gw = H // f_in, W // f_in
    ys, xs = _tile_starts(gh, tile, overlap), _tile_starts(gw, tile, overlap)
    out = wsum = None
    dtype = None
    for iy, y0 in enumerate(ys):
        th = min(tile, gh)
        wy = _ramp(th * f_out, overlap * f_out, iy > 0, iy < len(ys) - 1)
        for ix, x0 in enumerate(xs):
            tw = min(tile, gw)
            y = fn(x[:, :, y0 * f_in:(y0 + th) * f_in, x0 * f_in:(x0 + tw) * f_in])
            if out is None:
                dtype = y.dtype
                acc = torch.promote_types(dtype, torch.float32)
                out = y.new_zeros(N, y.shape[1], gh * f_out, gw * f_out, dtype=acc)
                wsum = torch.zeros(gh * f_out, gw * f_out, device=y.device, dtype=acc)
            w = (wy[:, None] * _ramp(tw * f_out, overlap * f_out, ix > 0, ix < len(xs) - 1)[None]).to(y.device, acc)
            sl = (slice(y0 * f_out, (y0 + th) * f_out), slice(x0 * f_out, (x0 + tw) * f_out))
            out[:, :, sl[0], sl[1]] += y.to(acc) * w
            wsum[sl] += w
            del y
    return (out / wsum).to(dtype)


def _gn(norm: nn.GroupNorm, x: Tensor, silu: bool, backend: str) -> Tensor:
    """GroupNorm (+ SiLU) of ``x [N, C, H, W]`` with ``norm``'s groups, eps and affine."""
    return mk.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps, silu=silu, backend=backend)


class SpatialResnetBlock(nn.Module):
    """diffusers ``ResnetBlock2D`` without a time embedding:
    ``y = shortcut(x) + conv2(silu(gn2(conv1(silu(gn1(x))))))``, 3x3 convs, a 1x1
    ``conv_shortcut`` when the width changes. ``[N, cin, H, W] -> [N, cout, H, W]``."""

    def __init__(self, cin: int, cout: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.backend = "auto"
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(_gn(self.norm1, x, True, self.backend))
        h = self.conv2(_gn(self.norm2, h, True, self.backend))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nn.Module):
    """The VAE mid-block's single-head self-attention over all pixels of a frame (diffusers
    ``Attention`` with ``group_norm``, ``residual_connection=True``, one head of width C):
    ``x + to_out(softmax(q k^T / sqrt(C)) v)`` with q, k, v projected from ``gn(x)``.
    ``[N, C, H, W] -> [N, C, H, W]``."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.backend = "auto"
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape
        h = _gn(self.group_norm, x, False, self.backend).reshape(N, C, H * W).transpose(1, 2)  # [N, HW, C]
        q, k, v = (lin(h)[:, None] for lin in (self.to_q, self.to_k, self.to_v))  # [N, 1, HW, C]
        o = F.scaled_dot_product_attention(q, k, v)[:, 0]  # [N, HW, C]
        o = self.to_out[0](o)
        return x + o.transpose(1, 2).reshape(N, C, H, W)


class _MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D``: resnet -> attention -> resnet at constant width."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([SpatialResnetBlock(channels, channels, groups),
                                      SpatialResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(channels, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Downsample(nn.Module):
    """diffusers ``Downsample2D(padding=0)``: pad one pixel right and bottom, stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Upsample(nn.Module):
    """diffusers ``Upsample2D``: nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A down (``DownEncoderBlock2D``) or up (``UpDecoderBlock2D``) block: resnets, then an
    optional resampler in ``downsamplers.0`` / ``upsamplers.0``."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: str | None) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(SpatialResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers))
        if resample == "down":
            self.downsamplers = nn.ModuleList([_Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([_Upsample(cout)])

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        for name in ("downsamplers", "upsamplers"):
            if hasattr(self, name):
                x = getattr(self, name)[0](x)
        return x


class SpatialEncoder(nn.Module):
    """Truncated SDXL encoder: ``[N, in_channels, H, W] -> [N, C_last, H / 2**(n-1), W / 2**(n-1)]``
    (``n = len(block_out_channels)``): ``conv_in``, the down blocks, the mid-block."""

    def __init__(self, in_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                 groups: int) -> None:
        super().__init__()
        ch = tuple(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            _Level(ch[max(i - 1, 0)], ch[i], layers_per_block, groups, "down" if i < len(ch) - 1 else None)
            for i in range(len(ch)))
        self.mid_block = _MidBlock(ch[-1], groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        return self.mid_block(x)


class SpatialDecoder(nn.Module):
    """Truncated SDXL decoder: ``[N, C_last, h, w] -> [N, out_channels, h * 2**(n-1), w * 2**(n-1)]``:
    the mid-block, the up blocks (``layers_per_block + 1`` resnets each), GroupNorm + SiLU,
    ``conv_out``."""

    def __init__(self, out_channels: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                 groups: int) -> None:
        super().__init__()
        self.backend = "auto"
        rev = tuple(reversed(block_out_channels))
        self.mid_block = _MidBlock(rev[0], groups)
        self.up_blocks = nn.ModuleList(
            _Level(rev[max(i - 1, 0)], rev[i], layers_per_block + 1, groups, "up" if i < len(rev) - 1 else None)
            for i in range(len(rev)))
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mid_block(x)
        x = x.to(self.conv_out.weight.dtype)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(_gn(self.conv_norm_out, x, True, self.backend))


class TruncatedAutoencoderKL(nn.Module):
    """The encoder/decoder pair of the public ``vae2d.AutoencoderKL`` as the released VAE uses it
    (``use_quant_conv=False``, ``use_post_quant_conv=False``, truncated forward; see the module
    docstring). State-dict keys ``encoder.*`` / ``decoder.*`` as diffusers; the unused released
    keys (:data:`RELEASED_UNUSED_SPATIAL_KEYS`) are accepted and dropped on load."""

    def __init__(self, in_channels: int = 3, block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
                 layers_per_block: int = 2, norm_num_groups: int = 32) -> None:
        super().__init__()
        if not block_out_channels or any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(f"block_out_channels {tuple(block_out_channels)} must be non-empty multiples of "
                             f"norm_num_groups={norm_num_groups}")
        if layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {layers_per_block}")
        self.encoder = SpatialEncoder(in_channels, tuple(block_out_channels), layers_per_block, norm_num_groups)
        self.decoder = SpatialDecoder(in_channels, tuple(block_out_channels), layers_per_block, norm_num_groups)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for k in RELEASED_UNUSED_SPATIAL_KEYS:
            state_dict.pop(prefix + k, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SpatialVAE(nn.Module):
    """Frame-wise truncated SDXL VAE (public ``MUGAutoencoderKL``): videos <-> 512-channel
    features at 1/8 of the frame size.

    Args:
        in_channels: image channels (3).
        block_out_channels, layers_per_block, norm_num_groups: the SDXL VAE shape
            (``(128, 256, 512, 512)``, 2, 32); smaller values give test-sized models.
        scaling_factor: features are ``encoder(x) * scaling_factor`` (0.18215, the public default).
        frame_batch: frames per micro-batch (public ``micro_batch_size=4``; ``None``: all at once).
        tile_size, tile_overlap: spatial tiling in pixels (``None``: off, the default; see
            :meth:`set_tiling`).

    Shapes: :meth:`encode` ``[B, 3, T, H, W] -> [B, C_last, T, H/f, W/f]``, :meth:`decode` the
    inverse map, ``f = 2 ** (len(block_out_channels) - 1)`` (8 for SDXL), H and W multiples of
    ``f``. Outputs are in the parameter dtype.

    Raises:
        ValueError: bad shape arguments (constructor); a 4-D/5-D input of the wrong channel
            count or a frame size not divisible by ``f`` (encode/decode).
    """

    def __init__(self, in_channels: int = 3, block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
                 layers_per_block: int = 2, norm_num_groups: int = 32, scaling_factor: float = SDXL_SCALING_FACTOR,
                 frame_batch: int | None = 4, tile_size: int | None = None, tile_overlap: int | None = None) -> None:
        super().__init__()
        if frame_batch is not None and (not isinstance(frame_batch, int) or frame_batch < 1):
            raise ValueError(f"frame_batch must be a positive int or None, got {frame_batch!r}")
        self.module = TruncatedAutoencoderKL(in_channels, block_out_channels, layers_per_block, norm_num_groups)
        self.in_channels = in_channels
        self.feature_channels = block_out_channels[-1]
        self.compression = 2 ** (len(block_out_channels) - 1)
        self.scaling_factor = float(scaling_factor)
        self.frame_batch = frame_batch
        self.set_kernels(True)
        self.set_tiling(tile_size, tile_overlap)

    def set_tiling(self, tile_size: int | None = None, overlap: int | None = None) -> SpatialVAE:
        """Encode and decode frames larger than ``tile_size x tile_size`` pixels in overlapping
        tiles (see the module docstring: lower peak memory, a result that departs from the
        public untiled one). ``tile_size=None`` turns tiling off (the default).

        Args:
            tile_size: tile side in pixels, a positive multiple of the compression ``f`` (8),
                e.g. 512; ``None``: off.
            overlap: pixels shared by neighbouring tiles, a multiple of ``f`` and at most half a
                tile (default: a quarter of the tile rounded down to a multiple of ``f``, as
                diffusers' ``tile_overlap_factor = 0.25``).

        Raises:
            ValueError: sizes that are not multiples of ``f``, or an overlap above half a tile.
        """
        f = self.compression
        if tile_size is None:
            if overlap is not None:
                raise ValueError("tile_overlap needs a tile_size")
            self.tile_size = self.tile_overlap = None
            return self
        if not isinstance(tile_size, int) or tile_size < f or tile_size % f:
            raise ValueError(f"tile_size must be a positive multiple of {f} pixels (or None), got {tile_size!r}")
        overlap = (tile_size // 4) // f * f if overlap is None else overlap
        if not isinstance(overlap, int) or overlap < 0 or overlap % f or 2 * overlap > tile_size:
            raise ValueError(f"tile_overlap must be a multiple of {f} pixels in [0, tile_size / 2], got {overlap!r}")
        self.tile_size, self.tile_overlap = tile_size, overlap
        return self

    def set_kernels(self, kernels: bool | str) -> SpatialVAE:
        """The ``backend`` of every :func:`mugv_kernels.group_norm_silu` call: True -> ``"auto"``
        (the fused kernel on CUDA), False -> ``"reference"`` (``F.group_norm`` + ``F.silu``), or a
        backend name.

        Raises:
            ValueError: an unknown backend name.
        """
        set_module_backend(self, kernels)
        return self

    def micro_batches(self, frames: int) -> int:
        """How many micro-batches ``frames`` frames run in (``ceil(frames / frame_batch)``)."""
        return 0 if frames < 1 else 1 if self.frame_batch is None else -(-frames // self.frame_batch)

    def _frames(self, fn, x: Tensor, channels: int, name: str, scale: int, callback=None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != channels:
            raise ValueError(f"{name} must be [B, {channels}, T, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        B, C, T, H, W = x.shape
        flat = x.transpose(1, 2).reshape(B * T, C, H, W).to(self.module.decoder.conv_out.weight.dtype)
        bs = flat.shape[0] if self.frame_batch is None else self.frame_batch
        f = self.compression
        if self.tile_size is not None and max(H, W) * (f if scale < 0 else 1) > self.tile_size:
            fi, fo = (f, 1) if scale > 0 else (1, f)
            run = lambda v: tiled_map(fn, v, tile=self.tile_size // f, overlap=self.tile_overlap // f,  # noqa: E731
                                      f_in=fi, f_out=fo)
        else:
            run = fn
        outs = []
        for i in range(0, flat.shape[0], max(bs, 1)):
            outs.append(run(flat[i:i + bs]))
            if callback is not None:
                callback()
        y = torch.cat(outs, dim=0) if outs else flat.new_zeros(0, 1, 1, 1)
        h, w = (H // scale, W // scale) if scale > 0 else (H * -scale, W * -scale)
        return y.reshape(B, T, y.shape[1] if outs else 0, h, w).transpose(1, 2)

    def encode(self, x: Tensor) -> Tensor:
        """``[B, 3, T, H, W]`` pixels in [-1, 1] -> ``[B, C_last, T, H/f, W/f]`` scaled features."""
        f = self.compression
        if isinstance(x, Tensor) and x.dim() == 5 and (x.shape[3] % f or x.shape[4] % f):
            raise ValueError(f"x height and width must be multiples of {f}, got {tuple(x.shape[3:])}")
        return self._frames(lambda v: self.module.encoder(v) * self.scaling_factor, x, self.in_channels, "x", f)

    def decode(self, z: Tensor, *, callback=None) -> Tensor:
        """``[B, C_last, T, h, w]`` scaled features -> ``[B, 3, T, h f, w f]`` pixels;
        ``callback()`` (optional) is called after each micro-batch (progress bars)."""
        return self._frames(lambda v: self.module.decoder(v / self.scaling_factor), z, self.feature_channels, "z",
                            -self.compression, callback)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
