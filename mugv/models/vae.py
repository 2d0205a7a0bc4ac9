"""Video VAE: 3D causal-conv autoencoder with a diagonal-Gaussian (KL) posterior.

``VideoVAE.from_preset(name, **overrides)`` (``VideoVAE(VAEConfig.from_preset(name, ...))``
for the first two) with three presets:

``"mugv-compat"``
    The temporal stage of the public MUG-V video VAE (``MUGVAETemporal`` in
    ``mug_v/encoder/vae/vae_temporal.py`` of ``Shopee-MUG/MUG-V``), rebuilt on our ops with
    the same parameter names and shapes (a public state dict loads with ``strict=True``)
    and the same outputs: the clip is cut into independent 8-frame chunks (front
    zero-padded to a multiple of 8), each encoded to one latent frame by convolutions
    with the public *symmetric* time padding; decoding runs over the whole latent
    sequence and drops the padded frames. The released pipeline
    (``MUGAutoencoderPipeline`` in ``mug_v/encoder/vae/vae.py``) adds, and so does this
    preset: ``micro_frame_size=48`` (clips are encoded and decoded 48 frames = 6 latents
    at a time), a ``8k+1``-frame clip gets its first frame repeated 7 times in front
    (``first_frame="replicate"``; a single image becomes 8 copies of itself, as the public
    I2V reference path does), and per-channel latent normalization ``(z - mean) / std``
    with the released statistics. Its input is the 512-channel feature map of the
    frame-wise SDXL image VAE (8x8 spatial compression, a stock diffusers
    ``AutoencoderKL``), which is *not* part of this preset: ``in_out_channels=3`` turns it
    into a pixel-space temporal VAE, useful for tests.

``"compact"``
    An all-3D, truly causal VAE from pixels (8x8x8 compression, 24 latent channels), small
    enough to train from scratch on a laptop CPU. The pixels are first folded 2x2 into
    channels (space-to-depth; the decoder unfolds them at the end), so no conv runs at full
    resolution. Every conv pads only the past
    (``dilation*(kT-1)`` frames before), every GroupNorm normalizes each frame on its own,
    downsampling is a stride-(2,2,2) causal conv and upsampling a causal conv followed by
    depth-to-space, so latent ``j`` depends only on frames ``<= 8j`` and frame ``t`` of the
    decoder output only on latents ``<= ceil(t / 8)``. A ``8k+1``-frame clip maps to ``k+1``
    latents, the first latent encoding the first frame alone (a single image is one
    latent: the I2V reference). Encoding and decoding stream: a clip cut into chunks, each
    conv fed the last frames of the previous chunk as ``context`` (a few frames per layer,
    so memory is bounded by the chunk), gives the same latents as one pass.

``"mugv-released"``
    The whole released MUG-V VAE (the public ``MUGAutoencoderPipeline``): the truncated SDXL
    image VAE per frame, then the ``"mugv-compat"`` temporal stage on its 512-channel
    features, then the file's latent ``scale``/``shift``. The config names both stages (the
    ``spatial_*`` and ``frame_batch`` fields, and the temporal fields as for compat);
    :meth:`VideoVAE.from_preset` / :meth:`VideoVAE.from_config` build it as a
    :class:`mugv.models.vae_released.ReleasedVideoVAE`, and :meth:`VideoVAE.from_released`
    loads the released ``vae.pt`` into it.

Latent normalization ``z_norm = (z - latent_mean) / latent_std`` (per channel) is part of
the config; :meth:`VideoVAE.encode` returns the posterior of the *normalized* latent (the
space the DiT works in) unless ``normalize=False``, and :meth:`VideoVAE.decode` takes
normalized latents unless ``normalized=False``. With the default statistics (compact:
mean 0, std 1) the two spaces coincide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mugv.models._backend import set_module_backend
from mugv.profiling import annotate
from mugv.models.vae_compat import CompatDecoder, CompatEncoder, ConvSlot, group_norm, norm_act

__all__ = ["DiagonalGaussian", "VAEConfig", "VideoVAE", "MUGV_LATENT_MEAN", "MUGV_LATENT_STD"]

# Per-channel statistics of the released MUG-V VAE latents (the `mean`/`std` defaults of
# `MUGVAE` in the public `mug_v/encoder/vae/vae.py`), used by the "mugv-compat" preset.
MUGV_LATENT_MEAN = (
    -0.0194091796875, 0.09619140625, -0.796875, 0.1591796875, -0.2578125, 0.359375, -0.3203125, -0.287109375,
    -0.0069580078125, 0.3046875, 0.310546875, -0.451171875, -0.1728515625, 0.369140625, 0.2177734375,
    -3.075599670410156e-05, 0.1630859375, -0.267578125, -0.1962890625, -0.1298828125, -0.28515625, -0.515625,
    0.5859375, -0.34375,
)
MUGV_LATENT_STD = (
    0.8817, 0.6523, 0.9152, 1.2117, 3.3516, 0.7528, 0.8177, 0.8637, 0.9075, 2.8875, 0.8980, 1.1202, 1.0003,
    2.5163, 0.6652, 1.2573, 0.7279, 1.0777, 1.5159, 0.8680, 1.1859, 1.0484, 2.4750, 1.5881,
)

_ARCHS = ("mugv-compat", "compact", "mugv-released")
_SDXL_WIDTHS = (128, 256, 512, 512)
# The public MUGVAETemporal builds its decoder with this time pattern whatever the encoder's.
_COMPAT_DECODER_TEMPORAL = (False, True, True)


# ----------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of :class:`VideoVAE`. Build it with :meth:`from_preset`.

    Fields (names of the public ``MUGVAETemporal`` constructor where they exist):
        arch: ``"mugv-compat"``, ``"compact"`` or ``"mugv-released"``.
        in_out_channels: channels of the video (3 for pixels; 512 for the public
            temporal VAE, which consumes SDXL-VAE features; released: the pixels, 3).
        latent_embed_dim: encoder output channels / 2 (compact: the latent channels).
        embed_dim: latent channels after ``quant_conv`` (compat); ``None`` means
            ``latent_embed_dim``; must equal it for compact.
        filters, channel_multipliers: width of each level is ``filters * mult``.
        num_res_blocks: ResBlocks per level.
        temporal_downsample: per level transition, halve time (compact: ``len ==
            len(channel_multipliers) - 1``; compat: the public encoder pattern).
        spatial_downsample: compact only, per transition, halve height and width.
        patch_size: compact only, space-to-depth factor applied to the pixels before the
            first conv (and depth-to-space after the last): the convs then run at
            ``1/patch_size`` resolution on ``3 * patch_size**2`` channels, which is what keeps
            the model cheap on a CPU (full-resolution 3D convs with few channels are slow).
        num_groups: GroupNorm groups (divides every width).
        activation_fn: ``"swish"`` (SiLU) or ``"relu"``.
        latent_mean, latent_std: per-channel latent statistics (``None``: 0 and 1).
        micro_frame_size: compat only, the public pipeline's chunk of frames encoded and
            decoded independently (multiple of 8; ``None``: whole clip at once).
        first_frame: how a clip whose length is not a whole number of latent frames is
            padded in front: ``"replicate"`` (copies of the first frame; compat only does
            this for ``8k+1`` frames, as the public pipeline) or ``"zeros"``.
        logvar_clamp: ``(min, max)`` clamp of the posterior log-variance (public: -30, 20).
        spatial_block_out_channels, spatial_layers_per_block, spatial_num_groups: released
            only, the truncated SDXL spatial stage (``(128, 256, 512, 512)``, 2, 32); the
            temporal stage then takes ``spatial_block_out_channels[-1]`` channels.
        frame_batch: released only, frames per spatial micro-batch (public 4; ``None``: all).

    Raises:
        ValueError: any inconsistent field (message names it).
    """

    arch: str = "compact"
    in_out_channels: int = 3
    latent_embed_dim: int = 24
    embed_dim: int | None = None
    filters: int = 8
    num_res_blocks: int = 1
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 8)
    temporal_downsample: tuple[bool, ...] = (True, True, True)
    spatial_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    num_groups: int = 4
    activation_fn: str = "swish"
    latent_mean: tuple[float, ...] | None = None
    latent_std: tuple[float, ...] | None = None
    micro_frame_size: int | None = None
    first_frame: str = "replicate"
    logvar_clamp: tuple[float, float] = (-30.0, 20.0)
    spatial_block_out_channels: tuple[int, ...] = _SDXL_WIDTHS
    spatial_layers_per_block: int = 2
    spatial_num_groups: int = 32
    frame_batch: int | None = 4

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        for name in ("channel_multipliers", "temporal_downsample", "spatial_downsample", "logvar_clamp",
                     "spatial_block_out_channels"):
            set_(name, tuple(getattr(self, name)))
        for name in ("latent_mean", "latent_std"):
            v = getattr(self, name)
            if v is not None:
                set_(name, tuple(float(a) for a in (v.tolist() if isinstance(v, Tensor) else v)))
        if self.embed_dim is None:
            set_("embed_dim", self.latent_embed_dim)
        if self.arch not in _ARCHS:
            raise ValueError(f"arch must be one of {_ARCHS}, got {self.arch!r}")
        for name in ("in_out_channels", "latent_embed_dim", "embed_dim", "filters", "num_res_blocks", "num_groups",
                     "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "num_res_blocks" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.channel_multipliers or any(int(m) < 1 for m in self.channel_multipliers):
            raise ValueError(f"channel_multipliers must be positive ints, got {self.channel_multipliers}")
        for m in self.channel_multipliers:
            if (self.filters * m) % self.num_groups:
                raise ValueError(f"num_groups={self.num_groups} must divide every width filters*mult "
                                 f"({self.filters}*{m})")
        if self.activation_fn not in ("swish", "relu"):
            raise ValueError(f"activation_fn must be 'swish' or 'relu', got {self.activation_fn!r}")
        if self.first_frame not in ("replicate", "zeros"):
            raise ValueError(f"first_frame must be 'replicate' or 'zeros', got {self.first_frame!r}")
        n_trans = len(self.channel_multipliers) - 1
        if self.arch == "compact":
            if self.embed_dim != self.latent_embed_dim:
                raise ValueError("compact: embed_dim must equal latent_embed_dim (there is no quant_conv)")
            for name in ("temporal_downsample", "spatial_downsample"):
                if len(getattr(self, name)) != n_trans:
                    raise ValueError(f"{name} must have len(channel_multipliers)-1 = {n_trans} entries, "
                                     f"got {getattr(self, name)}")
            if self.micro_frame_size is not None:
                raise ValueError("micro_frame_size is a mugv-compat option (compact streams exactly instead)")
        elif self.patch_size != 1:
            raise ValueError(f"patch_size is a compact option; {self.arch} needs patch_size=1")
        else:
            if self.arch == "mugv-released":
                self._check_released()
            if len(self.temporal_downsample) < n_trans or n_trans > len(_COMPAT_DECODER_TEMPORAL):
                raise ValueError(f"mugv-compat: need len(temporal_downsample) >= len(channel_multipliers)-1 and at "
                                 f"most 4 levels, got {self.temporal_downsample} / {self.channel_multipliers}")
            enc = 2 ** sum(bool(t) for t in self.temporal_downsample[:n_trans])
            dec = 2 * 2 ** sum(_COMPAT_DECODER_TEMPORAL[:n_trans])
            if enc != 8 or dec != 8:
                raise ValueError(f"mugv-compat: the public encoder cuts 8-frame chunks, so the encoder must compress "
                                 f"time by 8 (got {enc}) and the public decoder pattern (False, True, True) expands by "
                                 f"{dec}: use 4 channel_multipliers and three True temporal_downsample")
            if self.micro_frame_size is not None and (self.micro_frame_size < 8 or self.micro_frame_size % 8):
                raise ValueError(f"micro_frame_size must be a positive multiple of 8, got {self.micro_frame_size}")
        for name in ("latent_mean", "latent_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.latent_channels:
                raise ValueError(f"{name} must have latent_channels={self.latent_channels} entries, got {len(v)}")
        if self.latent_std is not None and any(s <= 0 for s in self.latent_std):
            raise ValueError("latent_std entries must be > 0")

    def _check_released(self) -> None:
        ch, g = self.spatial_block_out_channels, self.spatial_num_groups
        if not ch or not isinstance(g, int) or g < 1 or any(not isinstance(c, int) or c < 1 or c % g for c in ch):
            raise ValueError(f"spatial_block_out_channels {ch} must be non-empty positive multiples of "
                             f"spatial_num_groups={g}")
        if not isinstance(self.spatial_layers_per_block, int) or self.spatial_layers_per_block < 1:
            raise ValueError(f"spatial_layers_per_block must be a positive int, got {self.spatial_layers_per_block!r}")
        if self.frame_batch is not None and (not isinstance(self.frame_batch, int) or self.frame_batch < 1):
            raise ValueError(f"frame_batch must be a positive int or None, got {self.frame_batch!r}")

    def temporal_stage(self) -> VAEConfig:
        """The ``"mugv-compat"`` config of a ``"mugv-released"`` config's temporal stage:
        ``in_out_channels = spatial_block_out_channels[-1]``, the other temporal fields as set.

        Raises:
            ValueError: not a ``"mugv-released"`` config.
        """
        if self.arch != "mugv-released":
            raise ValueError(f"temporal_stage() needs a 'mugv-released' config, got arch={self.arch!r}")
        return replace(self, arch="mugv-compat", in_out_channels=self.spatial_block_out_channels[-1])

    # derived sizes ---------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        """Channels of the latent the DiT sees (``embed_dim``)."""
        return self.embed_dim

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame (8)."""
        if self.arch in ("mugv-compat", "mugv-released"):
            return 8
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    def is_whole_clip(self, num_frames: int) -> bool:
        """Whether ``num_frames`` is ``k * temporal_compression + 1`` (``k >= 0``; the
        ``8k+1`` rule: 1, 9, 17, ...): the clip lengths the causal VAE encodes with no
        padding (the first frame alone in the first latent), and the ones the compat
        preset gets by repeating the first frame (``first_frame="replicate"``)."""
        return num_frames >= 1 and (num_frames - 1) % self.temporal_compression == 0

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel along H and W (compat: 1, the SDXL stage is outside;
        released: ``2 ** (len(spatial_block_out_channels) - 1)``, 8)."""
        if self.arch == "mugv-compat":
            return 1
        if self.arch == "mugv-released":
            return 2 ** (len(self.spatial_block_out_channels) - 1)
        return self.patch_size * 2 ** sum(bool(s) for s in self.spatial_downsample)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> VAEConfig:
        """The config of preset ``name`` (``"mugv-compat"``, ``"compact"`` or
        ``"mugv-released"``) with fields replaced by ``overrides``.

        ``"mugv-compat"``: the released MUG-V temporal VAE: ``in_out_channels=512,
        latent_embed_dim=24, embed_dim=24, filters=128, num_res_blocks=4,
        channel_multipliers=(1, 2, 2, 4), temporal_downsample=(True, True, True),
        num_groups=32``, ``micro_frame_size=48``, the released latent mean/std.
        ``"compact"``: 3 -> 24 channels, 2x2 space-to-depth then ``filters=8,
        channel_multipliers=(1, 2, 4, 8)`` (widths 8/16/32/64), time halved at every
        transition and space at the last two (8x8x8 in all), one ResBlock per level, 4
        GroupNorm groups, 1.8 M parameters.
        ``"mugv-released"``: the whole released VAE: pixels (``in_out_channels=3``) through the
        SDXL spatial stage (``spatial_block_out_channels=(128, 256, 512, 512)``, 2 layers per
        block, 32 groups, ``frame_batch=4``), then the ``"mugv-compat"`` temporal fields above,
        the released latent mean/std (the file's ``shift``/``scale``); build it with
        :meth:`VideoVAE.from_preset`.

        Raises:
            ValueError: unknown preset, unknown override field, or an inconsistent result.
        """
        if name in ("mugv-compat", "mugv-released"):
            base: dict[str, Any] = dict(
                arch=name, in_out_channels=512 if name == "mugv-compat" else 3, latent_embed_dim=24, embed_dim=24,
                filters=128,
                num_res_blocks=4, channel_multipliers=(1, 2, 2, 4), temporal_downsample=(True, True, True),
                spatial_downsample=(False, False, False), patch_size=1, num_groups=32, micro_frame_size=48,
                latent_mean=MUGV_LATENT_MEAN, latent_std=MUGV_LATENT_STD, first_frame="replicate")
        elif name == "compact":
            base = dict(arch="compact")
        else:
            raise ValueError(f"unknown VAE preset {name!r}; expected one of {_ARCHS}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown VAEConfig field(s) {unknown}; fields are {sorted(known)}")
        if "latent_embed_dim" in overrides and "embed_dim" not in overrides:
            base["embed_dim"] = None
        if ("latent_embed_dim" in overrides or "embed_dim" in overrides) and name != "compact":
            # the released statistics only fit 24 channels
            if "latent_mean" not in overrides:
                base["latent_mean"] = None
            if "latent_std" not in overrides:
                base["latent_std"] = None
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (for checkpoints / JSON)."""
        return asdict(self)


# ----------------------------------------------------------------------------------------
# posterior
# ----------------------------------------------------------------------------------------


class DiagonalGaussian:
    """Diagonal Gaussian posterior ``N(mean, exp(logvar))`` over latents ``[B, C, L, h, w]``.

    Follows the public ``DiagonalGaussianDistribution`` (``mug_v/encoder/vae/utils.py``,
    from the LDM code, arXiv 2112.10752): log-variance clamped to ``[-30, 20]``, ``kl``
    summed over all non-batch dims.

    Args:
        mean, logvar: ``[B, C, L, h, w]`` same shape/dtype.
        clamp: ``(min, max)`` for ``logvar`` or None (no clamp).

    Attributes:
        mean, logvar, std, var: ``[B, C, L, h, w]``.
    """

    def __init__(self, mean: Tensor, logvar: Tensor, clamp: tuple[float, float] | None = (-30.0, 20.0)) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean and logvar must have the same shape, got {tuple(mean.shape)} and "
                             f"{tuple(logvar.shape)}")
        self.mean = mean
        self.logvar = logvar.clamp(*clamp) if clamp is not None else logvar
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: Tensor, clamp: tuple[float, float] | None = (-30.0, 20.0)) -> DiagonalGaussian:
        """From ``moments [B, 2C, ...]`` = ``cat([mean, logvar], dim=1)``."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar, clamp)

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps``, ``eps ~ N(0, I)`` drawn from ``generator`` (on ``mean``'s
        device) or the global RNG. Differentiable in mean/logvar (reparameterization)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The mean (the most likely latent)."""
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """``KL(self || other)`` (``other=None``: the standard normal), summed over all dims
        but the batch: ``[B]``."""
        dims = list(range(1, self.mean.dim()))
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: Tensor) -> Tensor:
        """Negative log-likelihood of ``sample`` summed over non-batch dims: ``[B]``."""
        dims = list(range(1, self.mean.dim()))
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=dims)

    def affine(self, shift: Tensor, scale: Tensor) -> DiagonalGaussian:
        """The distribution of ``(z - shift) / scale`` (``shift``/``scale`` broadcast, e.g.
        ``[1, C, 1, 1, 1]``): mean ``(mean - shift) / scale``, logvar ``- 2 log scale``."""
        out = DiagonalGaussian.__new__(DiagonalGaussian)
        out.mean = (self.mean - shift) / scale
        out.logvar = self.logvar - 2.0 * torch.log(scale)
        out.std = self.std / scale
        out.var = self.var / scale.pow(2)
        return out

    @staticmethod
    def cat(parts: list[DiagonalGaussian], dim: int = 2) -> DiagonalGaussian:
        """Concatenate posteriors along ``dim`` (latent frames by default)."""
        out = DiagonalGaussian.__new__(DiagonalGaussian)
        for name in ("mean", "logvar", "std", "var"):
            setattr(out, name, torch.cat([getattr(p, name) for p in parts], dim=dim))
        return out


# ----------------------------------------------------------------------------------------
# compact: a truly causal 3D VAE that streams
# ----------------------------------------------------------------------------------------


class _Stream:
    """Per-stream state: the frames each causal conv still needs (its history) and
    whether each upsampler already dropped its leading frames."""

    def __init__(self) -> None:
        self.history: dict[nn.Module, Tensor] = {}
        self.started: set[nn.Module] = set()


def _stream_conv(slot: ConvSlot, x: Tensor, stream: _Stream | None) -> Tensor:
    """``conv(x)`` as part of a stream: the conv sees the frames kept from the previous
    chunks instead of zero padding, then keeps the frames its next window starts from.
    Without a stream: the one-pass causal conv.

    A strided conv can leave fewer than ``P = dilation_t * (kT - 1)`` frames for the next
    window; then the kept frames and ``x`` are joined and their first ``P`` frames serve as
    ``context``, which is the same convolution without padding."""
    conv = slot.conv
    if stream is None:
        return conv(x)
    st, P = conv.stride[0], conv.context_frames
    hist = stream.history.get(conv)
    if hist is None or hist.shape[2] == P:
        y = conv(x, context=hist)
        seq_len = P + x.shape[2]
    else:
        seq = torch.cat([hist, x], dim=2)
        seq_len = seq.shape[2]
        y = conv(seq[:, :, P:], context=seq[:, :, :P]) if seq_len > P else conv(seq[:, :, :0])
    T = x.shape[2]
    keep = seq_len - y.shape[2] * st  # frames from the next window's start on
    if keep <= T:
        new = x[:, :, T - keep:]
    else:
        prev = hist if hist is not None else x.new_zeros(x.shape[0], x.shape[1], P, *x.shape[3:])
        new = torch.cat([prev[:, :, prev.shape[2] - (keep - T):], x], dim=2)
    if keep > 0:
        stream.history[conv] = new
    return y


def _frame_norm_act(norm: nn.Module, x: Tensor, activation: str) -> Tensor:
    """GroupNorm over (group channels, H, W) of each frame separately, then the activation.
    ``[B, C, T, H, W] -> [B, C, T, H, W]`` (per-frame statistics keep the model causal).

    Each sample's ``[C, T, H, W]`` goes to the op as ``T`` frames ``[T, C, H, W]``, a
    transposed view (``mugv_kernels.group_norm_silu`` reads any batch and channel
    strides), and the result is transposed back: no copy of the activations for ``B = 1``,
    one (the stack of the samples) otherwise."""
    if x.shape[2] == 0:
        return x
    ys = [norm_act(norm, xb.transpose(0, 1), activation).transpose(0, 1) for xb in x.unbind(0)]
    return ys[0].unsqueeze(0) if len(ys) == 1 else torch.stack(ys)


def _space_to_depth(x: Tensor, p: int) -> Tensor:
    """``[B, C, T, H, W] -> [B, C p^2, T, H/p, W/p]``, channel ``(c*p + a)*p + b`` <- pixel ``(p h + a, p w + b)``."""
    if p == 1:
        return x
    B, C, T, H, W = x.shape
    x = x.reshape(B, C, T, H // p, p, W // p, p).permute(0, 1, 4, 6, 2, 3, 5)
    return x.reshape(B, C * p * p, T, H // p, W // p)


def _depth_to_space(x: Tensor, p: int) -> Tensor:
    """Inverse of :func:`_space_to_depth`."""
    if p == 1:
        return x
    B, Cp, T, h, w = x.shape
    x = x.reshape(B, Cp // (p * p), p, p, T, h, w).permute(0, 1, 4, 5, 2, 6, 3)
    return x.reshape(B, Cp // (p * p), T, h * p, w * p)


class _CausalResBlock(nn.Module):
    """``x + conv2(act(gn2(conv1(act(gn1(x))))))`` with causal 3x3x3 convs and per-frame
    GroupNorm; 1x1x1 shortcut when the width changes. ``[B, cin, T, H, W] -> [B, cout, T, H, W]``."""

    def __init__(self, cin: int, cout: int, groups: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.norm1 = group_norm(groups, cin, activation, eps=1e-6)
        self.conv1 = ConvSlot(cin, cout, 3, time_padding="causal", bias=True)
        self.norm2 = group_norm(groups, cout, activation, eps=1e-6)
        self.conv2 = ConvSlot(cout, cout, 3, time_padding="causal", bias=True)
        self.shortcut = ConvSlot(cin, cout, 1, time_padding="causal", bias=False) if cin != cout else None

    def forward(self, x: Tensor, stream: _Stream | None = None) -> Tensor:
        h = _stream_conv(self.conv1, _frame_norm_act(self.norm1, x, self.activation), stream)
        h = _stream_conv(self.conv2, _frame_norm_act(self.norm2, h, self.activation), stream)
        return h + (self.shortcut(x) if self.shortcut is not None else x)


class _CausalUpsample(nn.Module):
    """Causal 3x3x3 conv to ``cout * ts * ss * ss`` channels, then depth-to-space (channel
    ``((c*ts + a)*ss + b)*ss + d`` -> frame ``ts*t + a``, row ``ss*h + b``, col ``ss*w + d``);
    the first ``ts - 1`` frames of the stream are dropped, so the first latent frame gives
    one frame (``L -> ts*(L-1) + 1``)."""

    def __init__(self, cin: int, cout: int, ts: int, ss: int) -> None:
        super().__init__()
        self.ts, self.ss, self.cout = ts, ss, cout
        self.conv = ConvSlot(cin, cout * ts * ss * ss, 3, time_padding="causal", bias=True)

    def forward(self, x: Tensor, stream: _Stream | None = None) -> Tensor:
        y = _stream_conv(self.conv, x, stream)
        B, _, T, H, W = y.shape
        ts, ss = self.ts, self.ss
        y = y.reshape(B, self.cout, ts, ss, ss, T, H, W).permute(0, 1, 5, 2, 6, 3, 7, 4)
        y = y.reshape(B, self.cout, T * ts, H * ss, W * ss)
        first = stream is None or self not in stream.started
        if stream is not None and T > 0:
            stream.started.add(self)
        if first and ts > 1 and T > 0:
            y = y[:, :, ts - 1:]
        return y


class CompactEncoder(nn.Module):
    """``[B, 3, T, H, W] -> moments [B, 2 z, 1 + (T-1) // ft, H / fs, W / fs]`` (causal)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        act, g = cfg.activation_fn, cfg.num_groups
        self.activation = act
        self.patch_size = cfg.patch_size
        self.conv_in = ConvSlot(cfg.in_out_channels * cfg.patch_size ** 2, widths[0], 3, time_padding="causal")
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        prev = widths[0]
        for i, w in enumerate(widths):
            self.levels.append(nn.ModuleList(_CausalResBlock(prev if j == 0 else w, w, g, act)
                                             for j in range(cfg.num_res_blocks)))
            prev = w if cfg.num_res_blocks else prev
            if i < len(widths) - 1:
                stride = (2 if cfg.temporal_downsample[i] else 1, 2 if cfg.spatial_downsample[i] else 1,
                          2 if cfg.spatial_downsample[i] else 1)
                self.downs.append(ConvSlot(prev, widths[i + 1], 3, stride=stride, time_padding="causal"))
                prev = widths[i + 1]
        self.mid = nn.ModuleList(_CausalResBlock(prev, prev, g, act) for _ in range(max(cfg.num_res_blocks, 1)))
        self.norm_out = group_norm(g, prev, act, eps=1e-6)
        self.conv_out = ConvSlot(prev, 2 * cfg.latent_embed_dim, 3, time_padding="causal")

    @annotate("vae.encoder")
    def forward(self, x: Tensor, stream: _Stream | None = None) -> Tensor:
        x = _stream_conv(self.conv_in, _space_to_depth(x, self.patch_size), stream)
        for i, level in enumerate(self.levels):
            for block in level:
                x = block(x, stream)
            if i < len(self.downs):
                x = _stream_conv(self.downs[i], x, stream)
        for block in self.mid:
            x = block(x, stream)
        return _stream_conv(self.conv_out, _frame_norm_act(self.norm_out, x, self.activation), stream)


class CompactDecoder(nn.Module):
    """``z [B, z, L, h, w] -> [B, 3, ft (L-1) + 1, fs h, fs w]`` (causal)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        widths = [cfg.filters * m for m in cfg.channel_multipliers]
        act, g = cfg.activation_fn, cfg.num_groups
        self.activation = act
        prev = widths[-1]
        self.conv_in = ConvSlot(cfg.latent_embed_dim, prev, 3, time_padding="causal")
        self.mid = nn.ModuleList(_CausalResBlock(prev, prev, g, act) for _ in range(max(cfg.num_res_blocks, 1)))
        levels: list[nn.Module] = []
        ups: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            w = widths[i]
            levels.append(nn.ModuleList(_CausalResBlock(prev if j == 0 else w, w, g, act)
                                        for j in range(cfg.num_res_blocks)))
            prev = w if cfg.num_res_blocks else prev
            if i > 0:
                ups.append(_CausalUpsample(prev, widths[i - 1], 2 if cfg.temporal_downsample[i - 1] else 1,
                                           2 if cfg.spatial_downsample[i - 1] else 1))
                prev = widths[i - 1]
        self.levels = nn.ModuleList(levels)  # deepest first
        self.ups = nn.ModuleList(ups)
        self.norm_out = group_norm(g, prev, act, eps=1e-6)
        self.patch_size = cfg.patch_size
        self.conv_out = ConvSlot(prev, cfg.in_out_channels * cfg.patch_size ** 2, 3, time_padding="causal")

    @annotate("vae.decoder")
    def forward(self, z: Tensor, stream: _Stream | None = None) -> Tensor:
        x = _stream_conv(self.conv_in, z, stream)
        for block in self.mid:
            x = block(x, stream)
        for i, level in enumerate(self.levels):
            for block in level:
                x = block(x, stream)
            if i < len(self.ups):
                x = self.ups[i](x, stream)
        x = _stream_conv(self.conv_out, _frame_norm_act(self.norm_out, x, self.activation), stream)
        return _depth_to_space(x, self.patch_size)


# ----------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------


def _check_video(name: str, x: Any, channels: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 5:
        raise ValueError(f"{name} must be 5-D [B, C, T, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels but the VAE config expects {channels} "
                         f"(shape {tuple(x.shape)})")
    if x.shape[2] < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} needs at least one sample and one frame, got shape {tuple(x.shape)}")
    return x


class VideoVAE(nn.Module):
    """Video VAE with a KL posterior (see the module docstring for the two presets).

    Args:
        config: a :class:`VAEConfig` (e.g. ``VAEConfig.from_preset("compact")``).
        kernels: the ``backend`` of every :class:`mugv_kernels.nn.CausalConv3d` and
            :class:`mugv_kernels.nn.GroupNormSiLU`: True = ``"auto"`` (the Triton kernels on
            CUDA, the PyTorch reference on a plain CPU and in fp64), False = ``"reference"``,
            or a name among ``"auto" | "triton" | "reference"``; :meth:`set_kernels` changes
            it later. Every backend gives the same math.

    Shapes (``ft = config.temporal_compression = 8``, ``fs = config.spatial_compression``):
        video ``[B, in_out_channels, T, H, W]`` <-> latents ``[B, latent_channels, L, H/fs, W/fs]``
        with ``L = ceil(T/8)`` for compat (``8k+1`` frames: ``k+1``) and
        ``L = ceil((T-1)/8) + 1`` for compact.

    State dict: compat uses the public module names (``encoder.*``, ``quant_conv.conv.*``,
    ``post_quant_conv.conv.*``, ``decoder.*``), so ``load_state_dict(public_sd, strict=True)``
    works; the latent statistics are non-persistent buffers (they live in the config).
    """

    def __init__(self, config: VAEConfig, kernels: bool | str = True) -> None:
        super().__init__()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        if config.arch == "mugv-released":
            raise ValueError("a 'mugv-released' config is the two-stage released VAE: build it with "
                             "VideoVAE.from_config(config) / VideoVAE.from_preset('mugv-released') (a "
                             "ReleasedVideoVAE), or load vae.pt with VideoVAE.from_released(path)")
        self.config = config
        c = config
        if c.arch == "mugv-compat":
            n = len(c.channel_multipliers) - 1
            self.encoder = CompatEncoder(c.in_out_channels, 2 * c.latent_embed_dim, c.filters, c.num_res_blocks,
                                         c.channel_multipliers, tuple(c.temporal_downsample[:n]), c.num_groups,
                                         c.activation_fn)
            self.quant_conv = ConvSlot(2 * c.latent_embed_dim, 2 * c.embed_dim, 1)
            self.post_quant_conv = ConvSlot(c.embed_dim, c.latent_embed_dim, 1)
            self.decoder = CompatDecoder(c.in_out_channels, c.latent_embed_dim, c.filters, c.num_res_blocks,
                                         c.channel_multipliers, _COMPAT_DECODER_TEMPORAL, c.num_groups,
                                         c.activation_fn)
        else:
            self.encoder = CompactEncoder(c)
            self.decoder = CompactDecoder(c)
        mean = torch.tensor(c.latent_mean if c.latent_mean is not None else [0.0] * c.latent_channels)
        std = torch.tensor(c.latent_std if c.latent_std is not None else [1.0] * c.latent_channels)
        self.register_buffer("latent_mean", mean.view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("latent_std", std.view(1, -1, 1, 1, 1), persistent=False)
        self.set_kernels(kernels)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: VAEConfig, kernels: bool | str = True, **kwargs: Any):
        """The VAE a config describes: ``VideoVAE(config, kernels)`` for ``"compact"`` and
        ``"mugv-compat"``, a :class:`mugv.models.vae_released.ReleasedVideoVAE` (random weights;
        ``kwargs`` such as ``tile_size``) for ``"mugv-released"``.

        Raises:
            TypeError: ``config`` is not a :class:`VAEConfig`. ValueError: ``kwargs`` for a
                preset that takes none, or the errors of the constructor.
        """
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, got {type(config).__name__}")
        if config.arch == "mugv-released":
            from mugv.models.vae_released import ReleasedVideoVAE

            return ReleasedVideoVAE(config, kernels=kernels, **kwargs)
        if kwargs:
            raise ValueError(f"{sorted(kwargs)}: options of the 'mugv-released' VAE, not of {config.arch!r}")
        return cls(config, kernels=kernels)

    @classmethod
    def from_preset(cls, name: str, *, kernels: bool | str = True, **overrides: Any):
        """``VideoVAE.from_config(VAEConfig.from_preset(name, **overrides), kernels)``: random
        weights in the preset's structure (``"mugv-released"``: a
        :class:`mugv.models.vae_released.ReleasedVideoVAE`, the layout of the released
        ``vae.pt``).

        Raises:
            ValueError: unknown preset or override field, or an inconsistent config.
        """
        return cls.from_config(VAEConfig.from_preset(name, **overrides), kernels=kernels)

    # ------------------------------------------------------------------ helpers
    def set_kernels(self, kernels: bool | str) -> VideoVAE:
        """Set the ``backend`` of every conv and GroupNorm (see the class docstring).

        Raises:
            ValueError: an unknown backend name.
        """
        set_module_backend(self, kernels)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def out_channels(self) -> int:
        """Latent channels (public attribute name)."""
        return self.config.latent_channels

    def normalize(self, z: Tensor) -> Tensor:
        """``(z - latent_mean) / latent_std`` per channel, ``z [B, C, L, h, w]``."""
        return (z - self.latent_mean.to(z.dtype)) / self.latent_std.to(z.dtype)

    def denormalize(self, z: Tensor) -> Tensor:
        """``z * latent_std + latent_mean`` per channel (inverse of :meth:`normalize`)."""
        return z * self.latent_std.to(z.dtype) + self.latent_mean.to(z.dtype)

    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames for a clip of ``num_frames`` frames (see the class docstring)."""
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        c = self.config
        ft = c.temporal_compression
        if c.arch == "compact":
            return (num_frames - 1 + ft - 1) // ft + 1
        m = c.micro_frame_size
        if c.first_frame == "replicate" and c.is_whole_clip(num_frames):
            num_frames += ft - 1
        if m is None:
            return -(-num_frames // ft)
        full, rest = divmod(num_frames, m)
        return full * (m // ft) + -(-rest // ft)

    def num_output_frames(self, num_latent_frames: int) -> int:
        """Frames :meth:`decode` returns for ``num_latent_frames`` when ``num_frames`` is None."""
        ft = self.config.temporal_compression
        return ft * (num_latent_frames - 1) + 1 if self.config.arch == "compact" else ft * num_latent_frames

    def get_latent_size(self, input_size: tuple[int | None, int | None, int | None]) -> list[int | None]:
        """``[L, h, w]`` for a video ``(T, H, W)`` (``None`` entries pass through), as the
        public ``get_latent_size``."""
        T, H, W = input_size
        fs = self.config.spatial_compression
        return [None if T is None else self.num_latent_frames(T), None if H is None else H // fs,
                None if W is None else W // fs]

    def _prepare(self, x: Tensor) -> Tensor:
        x = _check_video("x", x, self.config.in_out_channels)
        fs = self.config.spatial_compression
        if x.shape[3] % fs or x.shape[4] % fs:
            raise ValueError(f"x height and width must be multiples of the spatial compression {fs}, got "
                             f"{tuple(x.shape[3:])}")
        return x.to(self.dtype)

    def _pad_front(self, x: Tensor, n: int) -> Tensor:
        if n <= 0:
            return x
        if self.config.first_frame == "replicate":
            pad = x[:, :, :1].expand(-1, -1, n, -1, -1)
        else:
            pad = x.new_zeros(x.shape[0], x.shape[1], n, *x.shape[3:])
        return torch.cat([pad, x], dim=2)

    # ------------------------------------------------------------------ encode
    @annotate("vae.encode")
    def encode(self, x: Tensor, *, normalize: bool = True, chunk_frames: int | None = None) -> DiagonalGaussian:
        """Encode a video (or a single image, ``T = 1``) to the latent posterior.

        Args:
            x: ``[B, in_out_channels, T, H, W]`` float, pixels in ``[-1, 1]`` (compat: the
                SDXL-VAE features). Cast to the model dtype.
            normalize: return the posterior of the normalized latent
                ``(z - latent_mean) / latent_std`` (default) or of the raw latent.
            chunk_frames: stream the clip this many frames at a time (a multiple of 8;
                memory bounded by the chunk). compact: exact streaming with carried
                context (same latents as one pass up to float rounding). compat: groups of
                the public independent 8-frame chunks (same result as one pass).
                ``None``: one pass.

        Returns:
            :class:`DiagonalGaussian` with ``mean``/``logvar`` ``[B, latent_channels, L, H/fs, W/fs]``.

        Padding of clips that are not a whole number of latent frames: compact pads
        ``T`` up to ``8k+1`` in front (``first_frame``: copies of frame 0, or zeros);
        compat repeats frame 0 seven times in front of a ``8k+1``-frame clip
        (``first_frame="replicate"``, the public pipeline) and otherwise pads zeros in
        front to a multiple of 8 (the public ``MUGVAETemporal.encode``), per
        ``micro_frame_size`` chunk when that is set.

        Raises:
            TypeError / ValueError: ``x`` not a float 5-D tensor with ``in_out_channels``
                channels, H/W not multiples of the spatial compression, bad ``chunk_frames``.
        """
        x = self._prepare(x)
        ft = self.config.temporal_compression
        if chunk_frames is not None and (not isinstance(chunk_frames, int) or chunk_frames < ft or chunk_frames % ft):
            raise ValueError(f"chunk_frames must be a positive multiple of {ft}, got {chunk_frames!r}")
        if self.config.arch == "compact":
            T = x.shape[2]
            x = self._pad_front(x, (-(T - 1)) % ft)
            if chunk_frames is None:
                post = DiagonalGaussian.from_moments(self.encoder(x), self.config.logvar_clamp)
            else:
                post = DiagonalGaussian.cat(list(self.encode_stream(x.split(chunk_frames, dim=2),
                                                                    normalize=False)))
        else:
            post = self._encode_compat(x, chunk_frames)
        return post.affine(self.latent_mean.to(post.mean.dtype), self.latent_std.to(post.mean.dtype)) \
            if normalize else post

    def encode_stream(self, chunks: Iterable[Tensor], *, normalize: bool = True) -> Iterator[DiagonalGaussian]:
        """compact only: encode a clip given as consecutive chunks ``[B, 3, T_i, H, W]``,
        yielding the posterior of the latents each chunk completes. Each conv keeps the
        last few frames it saw, so the concatenated result equals :meth:`encode` of the
        whole clip (which must have ``8k+1`` frames; no front padding is added here). With
        chunk lengths multiples of 8 every chunk yields ``T_i / 8`` latents (the last,
        ``8j+1``-long chunk ``j+1``).

        Raises:
            ValueError: compat preset (its chunks are independent: use
                ``encode(chunk_frames=...)``), or a bad chunk.
        """
        if self.config.arch != "compact":
            raise ValueError("encode_stream needs the causal 'compact' VAE; mugv-compat encodes independent 8-frame "
                             "chunks: use encode(x, chunk_frames=...)")
        stream = _Stream()
        for chunk in chunks:
            chunk = self._prepare(chunk)
            moments = self.encoder(chunk, stream)
            if moments.shape[2] == 0:
                continue
            post = DiagonalGaussian.from_moments(moments, self.config.logvar_clamp)
            yield post.affine(self.latent_mean.to(post.mean.dtype), self.latent_std.to(post.mean.dtype)) \
                if normalize else post

    def _encode_compat_chunk(self, x: Tensor, group: int | None) -> Tensor:
        """public ``MUGVAETemporal.encode`` up to the moments: ``[B, C, T, H, W]`` ->
        ``[B, 2 embed_dim, ceil(T/8), H, W]``."""
        T, ft = x.shape[2], self.config.temporal_compression
        x = torch.cat([x.new_zeros(*x.shape[:2], (-T) % ft, *x.shape[3:]), x], dim=2) if T % ft else x
        B, C, T, H, W = x.shape
        n = T // ft
        xs = x.reshape(B, C, n, ft, H, W).transpose(1, 2).reshape(B * n, C, ft, H, W)  # independent chunks
        outs = []
        for part in (xs.split(group) if group else (xs,)):
            outs.append(self.quant_conv(self.encoder(part)))
        m = torch.cat(outs, dim=0)  # [B n, 2E, 1, H, W]
        return m.reshape(B, n, m.shape[1], H, W).transpose(1, 2)

    def _encode_compat(self, x: Tensor, chunk_frames: int | None) -> DiagonalGaussian:
        c = self.config
        ft = c.temporal_compression
        group = chunk_frames // ft if chunk_frames is not None else None
        if c.first_frame == "replicate" and c.is_whole_clip(x.shape[2]):
            x = self._pad_front(x, ft - 1)
        if c.micro_frame_size is None:
            moments = self._encode_compat_chunk(x, group)
        else:
            moments = torch.cat([self._encode_compat_chunk(part, group)
                                 for part in x.split(c.micro_frame_size, dim=2)], dim=2)
        return DiagonalGaussian.from_moments(moments, c.logvar_clamp)

    # ------------------------------------------------------------------ decode
    @annotate("vae.decode")
    def decode(self, z: Tensor, num_frames: int | None = None, *, normalized: bool = True,
               chunk_latents: int | None = None) -> Tensor:
        """Decode latents to a video.

        Args:
            z: ``[B, latent_channels, L, h, w]`` float (normalized latents unless
                ``normalized=False``).
            num_frames: frames of the clip that was encoded; the leading frames that
                encoding padded are dropped (compact: ``8(L-1)+1 - num_frames < 8`` frames;
                compat: ``(-num_frames) % 8`` frames per decoded chunk, the public rule).
                ``None``: no frames dropped (``8(L-1)+1`` compact, ``8L`` compat).
            normalized: whether ``z`` is normalized (see :meth:`normalize`).
            chunk_latents: compact: stream this many latent frames at a time (exact, same
                video as one pass up to float rounding). compat: ignored (its chunking is
                ``micro_frame_size``, as the public pipeline).

        Returns:
            ``[B, in_out_channels, T, h*fs, w*fs]`` in the model dtype.

        Raises:
            TypeError / ValueError: ``z`` not a float 5-D tensor with ``latent_channels``
                channels, or ``num_frames`` inconsistent with ``L``.
        """
        z = _check_video("z", z, self.config.latent_channels).to(self.dtype)
        if normalized:
            z = self.denormalize(z)
        L = z.shape[2]
        full = self.num_output_frames(L)
        if num_frames is not None:
            low = max(full - self.config.temporal_compression + 1, 1)
            if not isinstance(num_frames, int) or not low <= num_frames <= full:
                raise ValueError(f"num_frames={num_frames!r} does not fit {L} latent frames: expected an int in "
                                 f"[{low}, {full}]")
        if self.config.arch == "compact":
            if chunk_latents is not None and (not isinstance(chunk_latents, int) or chunk_latents < 1):
                raise ValueError(f"chunk_latents must be a positive int, got {chunk_latents!r}")
            if chunk_latents is None:
                x = self.decoder(z)
            else:
                x = torch.cat(list(self.decode_stream(z.split(chunk_latents, dim=2), normalized=False)), dim=2)
            return x if num_frames is None else x[:, :, full - num_frames:]
        return self._decode_compat(z, num_frames if num_frames is not None else full)

    def decode_stream(self, chunks: Iterable[Tensor], *, normalized: bool = True) -> Iterator[Tensor]:
        """compact only: decode consecutive latent chunks ``[B, C, L_i, h, w]``, yielding
        the frames each completes (first chunk ``8 L_0 - 7``, then ``8 L_i``); the
        concatenation equals :meth:`decode` of the whole latent (``num_frames=None``).

        Raises:
            ValueError: compat preset, or a bad chunk.
        """
        if self.config.arch != "compact":
            raise ValueError("decode_stream needs the causal 'compact' VAE")
        stream = _Stream()
        for chunk in chunks:
            chunk = _check_video("z chunk", chunk, self.config.latent_channels).to(self.dtype)
            yield self.decoder(self.denormalize(chunk) if normalized else chunk, stream)

    def _decode_compat_chunk(self, z: Tensor, num_frames: int) -> Tensor:
        """public ``MUGVAETemporal.decode``."""
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, (-num_frames) % self.config.temporal_compression:]

    def _decode_compat(self, z: Tensor, num_frames: int) -> Tensor:
        mf = self.config.micro_frame_size
        if mf is None:
            return self._decode_compat_chunk(z, num_frames)
        outs = []
        remaining = num_frames
        for part in z.split(mf // self.config.temporal_compression, dim=2):  # the public pipeline's loop
            outs.append(self._decode_compat_chunk(part, min(mf, remaining)))
            remaining -= mf
        return torch.cat(outs, dim=2)

    # ------------------------------------------------------------------ checkpoints
    def load_public_state_dict(self, state_dict: dict[str, Tensor] | str) -> dict[str, Any]:
        """Load released MUG-V VAE weights into a ``"mugv-compat"`` model, strictly.

        Accepts either a ``MUGVAETemporal`` state dict (keys ``encoder.*``, ``quant_conv.*``,
        ...) or the whole released pipeline checkpoint (``MUGAutoencoderPipeline``: keys
        ``temporal_vae.*``, ``spatial_vae.*``, ``scale``, ``shift``, ``logvar``), or a path
        to either (``.pt``/``.pth``/``.safetensors``). From a pipeline checkpoint the
        temporal part is loaded, ``shift``/``scale`` must match the config's
        ``latent_mean``/``latent_std`` (when those are set; else they are adopted), and the
        ``spatial_vae.*`` keys (the SDXL image VAE, not part of this model) are reported.

        Returns:
            ``{"ignored": [keys not loaded], "latent_mean": ..., "latent_std": ...}``.

        Raises:
            ValueError: not a compat model, or latent statistics that disagree with the
                config. RuntimeError: missing/unexpected temporal keys (all listed, by
                ``load_state_dict(strict=True)``).
        """
        if self.config.arch != "mugv-compat":
            raise ValueError("load_public_state_dict needs a 'mugv-compat' VideoVAE")
        if isinstance(state_dict, (str, bytes)) or hasattr(state_dict, "__fspath__"):
            from mugv.models.checkpoint import read_state_dict

            state_dict = read_state_dict(state_dict)
        ignored: list[str] = []
        if any(k.startswith("temporal_vae.") for k in state_dict):
            temporal = {k[len("temporal_vae."):]: v for k, v in state_dict.items() if k.startswith("temporal_vae.")}
            ignored = sorted(k for k in state_dict if not k.startswith("temporal_vae.") and k not in ("scale", "shift"))
            for key, buf, field_name in (("shift", self.latent_mean, "latent_mean"),
                                         ("scale", self.latent_std, "latent_std")):
                if key not in state_dict:
                    continue
                val = state_dict[key].detach().float().reshape(-1)
                val = val.expand(buf.numel()) if val.numel() == 1 else val
                if val.numel() != buf.numel():
                    raise ValueError(f"checkpoint {key} has {val.numel()} entries, expected {buf.numel()}")
                if getattr(self.config, field_name) is None:
                    buf.copy_(val.view_as(buf))
                elif not torch.allclose(val.to(buf), buf.reshape(-1), rtol=1e-3, atol=1e-4):
                    raise ValueError(f"checkpoint {key} differs from config.{field_name}; build the config with "
                                     f"{field_name}=None to adopt the checkpoint's statistics")
        else:
            temporal = dict(state_dict)
        self.load_state_dict(temporal, strict=True)
        return {"ignored": ignored, "latent_mean": self.latent_mean.reshape(-1).clone(),
                "latent_std": self.latent_std.reshape(-1).clone()}

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None
                ) -> tuple[Tensor, DiagonalGaussian, Tensor]:
        """Autoencode ``x`` (VAE training): ``(reconstruction [like x], raw posterior, z)``.
        The posterior and ``z`` are in the raw (un-normalized) latent space."""
        post = self.encode(x, normalize=False)
        z = post.sample(generator) if sample_posterior else post.mode()
        return self.decode(z, num_frames=x.shape[2], normalized=False), post, z

    def extra_repr(self) -> str:
        c = self.config
        return (f"arch={c.arch}, in={c.in_out_channels}, latent={c.latent_channels}, "
                f"compression=({c.temporal_compression}, {c.spatial_compression}, {c.spatial_compression}), "
                f"kernels={self.kernels}")

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, path, *, device: torch.device | str = "cpu", kernels: bool | None = None) -> VideoVAE:
        """Load a VAE written by :meth:`save_pretrained` (``mugv train-vae`` writes one).

        Args:
            path: the checkpoint directory (``config.json`` with the :class:`VAEConfig`
                under ``"vae"``, ``vae.safetensors`` with the weights).
            device: where to put it.
            kernels: passed to the constructor (default: True on CUDA, False elsewhere).

        Returns:
            The VAE in eval mode on ``device``.

        Raises:
            FileNotFoundError: ``path`` lacks ``config.json`` or ``vae.safetensors``.
            RuntimeError: the weights do not fit the config (``load_state_dict(strict=True)``).
        """
        import json
        from pathlib import Path

        from safetensors.torch import load_file

        path = Path(path)
        for f in ("config.json", "vae.safetensors"):
            if not (path / f).exists():
                raise FileNotFoundError(f"VAE checkpoint {path}: {f} missing (write one with `mugv train-vae`)")
        config = VAEConfig(**json.loads((path / "config.json").read_text())["vae"])
        device = torch.device(device)
        vae = cls(config, kernels=device.type == "cuda" if kernels is None else kernels)
        vae.load_state_dict(load_file(str(path / "vae.safetensors")), strict=True)
        return vae.to(device).eval()

    @classmethod
    def from_released(cls, path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      kernels: bool = True, **kwargs: Any):
        """The released MUG-V VAE (preset ``"mugv-released"``: the truncated SDXL spatial stage,
        this class's ``"mugv-compat"`` temporal stage, the file's latent scale/shift) from the
        ``MUG-V-inference`` ``vae.pt`` (or its directory), loaded strictly; returns a
        :class:`mugv.models.vae_released.ReleasedVideoVAE` (same ``encode``/``decode``/
        ``normalize`` interface) in eval mode, ``dtype`` on ``device``. ``kwargs``:
        ``frame_batch`` (spatial micro-batch, 4), ``micro_frame_size`` (48).

        Raises:
            FileNotFoundError: no ``vae.pt`` (names the expected layout).
            ValueError: not a released VAE state dict, or mismatched keys/shapes (all listed).
        """
        from mugv.models.vae_released import ReleasedVideoVAE

        return ReleasedVideoVAE.from_released(path, device=device, dtype=dtype, kernels=kernels, **kwargs)

    def save_pretrained(self, path, extra: dict[str, Any] | None = None):
        """Write ``vae.safetensors`` (weights, CPU, contiguous) and ``config.json``
        (``{"vae": config.to_dict(), **extra}``) to the directory ``path``, each file to a
        temporary name first and then renamed, so a crash never leaves a half-written file.

        Returns:
            ``path`` as a ``pathlib.Path``.
        """
        import json
        import os
        from pathlib import Path

        from safetensors.torch import save_file

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(out / "vae.safetensors.tmp"))
        os.replace(out / "vae.safetensors.tmp", out / "vae.safetensors")
        (out / "config.json.tmp").write_text(json.dumps({"vae": self.config.to_dict(), **(extra or {})}, indent=1))
        os.replace(out / "config.json.tmp", out / "config.json")
        return out
