"""The MUG-V video DiT (arXiv 2510.17519 Sec. 3), checkpoint-compatible with the public code.

:class:`MUGDiT` has the parameter names and shapes of ``MUGDiT`` in ``mug_v/dit/model.py`` of
``Shopee-MUG/MUG-V``, so the released 10B checkpoint loads with ``strict=True``
(:func:`mugv.models.load_checkpoint`). Two entry points share one packed core:

* :meth:`MUGDiT.forward` — the public signature and semantics
  ``forward(x, timestep, y, mask=None, x_mask=None, fps=None, frame_indice=None)``:
  a batch of equally sized latents ``[B, C, T, H, W]`` -> ``[B, 2C, T, H, W]`` fp32.
* :meth:`MUGDiT.forward_packed` — beyond the public code: clips of different ``(T, H, W)``
  with their own captions in one call (one THD sequence, ``cu_seqlens``), equal to running
  each clip alone.

Architecture (public code): patch embedding (Conv3d, patch (1, 2, 2)) with a learned start
and end token around each clip; adaLN-single: ``t = TimestepEmbedder(timestep) +
FpsEmbedder(fps)``, ``t_mlp = t_block(t)`` shared by all blocks, each block adding its own
``scale_shift_table``; image-to-video: conditioned latent frames and the start/end tokens use
the modulation of timestep 0 (``t0``); self-attention with QK RMSNorm and interleaved 3D RoPE
(sections of ``head_dim / 3`` over (h, w, t), theta 1e4, frame positions from
``frame_indice`` clamped to ``[0, 479]``); cross-attention to the caption (T5 states through
``TextEmbedder``); final modulated LayerNorm + Linear to ``2 * in_channels`` per latent
element (the sampler uses the first ``in_channels``).

The model knows nothing about parallelism; build big flavors on the meta device::

    with torch.device("meta"):
        model = MUGDiT(DiTConfig.from_flavor("10b"))
    model.to_empty(device="cuda"); model.init_weights()   # or load_checkpoint(model, path)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mugv.models._backend import resolve_backend
from mugv.profiling import nvtx_range
from mugv.models.dit_layers import (
    FinalLayer,
    FpsEmbedder,
    MUGDiTBlock,
    PackedBatch,
    PatchEmbed3D,
    TextEmbedder,
    TimestepEmbedder,
)

__all__ = ["FLAVORS", "DiTConfig", "MUGDiT"]


# ----------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------

FLAVORS: dict[str, dict] = {
    # CPU-trainable in minutes: 4 blocks of width 96 (2 heads of 48 = 3 RoPE sections of 16),
    # 384-d captions = all-MiniLM-L6-v2 token states.
    "tiny": dict(depth=4, hidden_size=96, num_heads=2, text_dim=384),
    "debug": dict(hidden_size=288, num_heads=4),
    "1b": dict(hidden_size=1152, num_heads=16),
    "4b": dict(hidden_size=2304, num_heads=32),
    "10b": dict(hidden_size=3456, num_heads=48),
    "18b": dict(hidden_size=4608, num_heads=64),
}
"""Named sizes (paper Table 1 / public ``MUGDiT_10B``): all depth 56, head_dim 72 except ``tiny``."""


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of :class:`MUGDiT` (defaults: the public 10B model).

    Attributes:
        depth: number of blocks (56).
        hidden_size: model width ``C`` (3456).
        num_heads: attention heads; ``head_dim = hidden_size / num_heads`` must be a multiple
            of 6 (three even RoPE sections).
        patch_size: ``(pt, ph, pw)`` latent patch (``(1, 2, 2)``).
        in_channels: latent channels (24); the output has ``2 * in_channels``.
        text_dim: caption feature size (4096, T5-v1.1-XXL).
        mlp_ratio: MLP hidden = ``int(hidden_size * mlp_ratio)`` (4.0).
        eps: epsilon of every LayerNorm / RMSNorm (1e-6).
        rope_theta: RoPE base (1e4).
        rope_max_time: frame positions are clamped to ``[0, rope_max_time - 1]`` as the
            public table of 480 entries does (None: no clamp).
        frequency_embedding_size: sinusoid width of the timestep/fps embedders (256).

    Raises:
        ValueError: a non-positive size, ``hidden_size`` not divisible by ``num_heads``,
            ``head_dim`` not a multiple of 6, a patch that is not three positive ints.
    """

    depth: int = 56
    hidden_size: int = 3456
    num_heads: int = 48
    patch_size: tuple[int, int, int] = (1, 2, 2)
    in_channels: int = 24
    text_dim: int = 4096
    mlp_ratio: float = 4.0
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_time: int | None = 480
    frequency_embedding_size: int = 256
    flavor: str | None = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        for name in ("depth", "hidden_size", "num_heads", "in_channels", "text_dim", "frequency_embedding_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {v!r}")
        if len(self.patch_size) != 3 or not all(isinstance(p, int) and p > 0 for p in self.patch_size):
            raise ValueError(f"DiTConfig.patch_size must be three positive ints (pt, ph, pw), got {self.patch_size!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        if self.head_dim % 6:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.head_dim} must be a multiple of 6 "
                "(three even 3D-RoPE sections for h, w, t)"
            )
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.rope_max_time is not None and self.rope_max_time <= 0:
            raise ValueError(f"DiTConfig.rope_max_time must be positive or None, got {self.rope_max_time!r}")

    @property
    def head_dim(self) -> int:
        """``hidden_size // num_heads`` (72 for every named flavor but ``tiny``)."""
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        """Output channels per latent element: ``2 * in_channels`` (public ``output_channels``)."""
        return 2 * self.in_channels

    @property
    def rope_sections(self) -> tuple[int, int, int]:
        """RoPE widths for (h, w, t): ``head_dim / 3`` each ((24, 24, 24) for head_dim 72)."""
        s = self.head_dim // 3
        return (s, s, s)

    @classmethod
    def from_flavor(cls, name: str, **overrides) -> DiTConfig:
        """The named flavor (see :data:`FLAVORS`) with fields replaced by ``overrides``.

        Args:
            name: one of ``tiny, debug, 1b, 4b, 10b, 18b``.
            **overrides: any field, e.g. ``depth=2, text_dim=384, patch_size=(1, 2, 2)``.

        Raises:
            ValueError: unknown flavor or override field, or an invalid resulting config.
        """
        if name not in FLAVORS:
            raise ValueError(f"unknown DiT flavor {name!r}; expected one of {sorted(FLAVORS)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"flavor"}
        bad = sorted(set(overrides) - names)
        if bad:
            raise ValueError(f"unknown DiTConfig field(s) {bad}; expected among {sorted(names)}")
        return cls(**{**FLAVORS[name], **overrides, "flavor": name})


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------


def _tensor(name: str, t: object, ndim: int | tuple[int, ...] | None = None) -> Tensor:
    """``t`` if it is a tensor of an allowed rank; TypeError / ValueError naming ``name`` otherwise."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    return t


def _int_tensor(name: str, t: Tensor) -> Tensor:
    """``t`` if it has an integer dtype; TypeError naming ``name`` otherwise."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer frame indices, got dtype {t.dtype}")
    return t


def _per_sample(name: str, t: Tensor, B: int) -> Tensor:
    """Repeat a ``[B', ...]`` tensor to ``B`` rows when ``B'`` divides ``B`` (the public code
    does this for classifier-free guidance, where cond and uncond share one ``fps``/``frame_indice``)."""
    if t.shape[0] == B:
        return t
    if t.shape[0] == 0 or B % t.shape[0]:
        raise ValueError(f"{name} has {t.shape[0]} rows; expected the batch size {B} or a divisor of it")
    return t.repeat(B // t.shape[0], *([1] * (t.dim() - 1)))


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class MUGDiT(nn.Module):
    """MUG-V diffusion transformer; parameter names/shapes = public ``MUGDiT``.

    Args:
        cfg: a :class:`DiTConfig` or a flavor name (default: the 10B config).
        kernels: the ``backend`` the :mod:`mugv_kernels` norm and RoPE ops run: True =
            ``"auto"`` (the fused Triton kernels on CUDA, the PyTorch reference on a plain
            CPU and in fp64), False = ``"reference"``, or a name among
            ``"auto" | "triton" | "reference"``. Every backend gives the same result
            within rounding. Setting the ``kernels`` attribute later switches the
            ``backend`` attribute likewise.
        attn_backend: ``backend`` of ``mugv_kernels.varlen_attention`` (default
            ``"auto"``: flash-attn / PyTorch native / FlexAttention / per-segment SDPA,
            whichever runs here; FlexAttention when compiled on a CPU); attribute
            ``attn_backend``.

    Raises:
        TypeError: ``cfg`` of the wrong type. ValueError: an unknown ``kernels`` name.

    Parameters (public names): ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
    ``fps_embedder.mlp.{0,2}``, ``t_block.1``, ``y_embedder.y_proj.fc{1,2}``,
    ``blocks.{i}.{attn.qkv, attn.q_norm, attn.k_norm, attn.proj, cross_attn_norm,
    cross_attn.q_linear, cross_attn.kv_linear, cross_attn.q_norm, cross_attn.k_norm,
    cross_attn.proj, mlp.fc1, mlp.fc2, scale_shift_table}``, ``start_token``, ``end_token``,
    ``final_layer.linear``, ``final_layer.scale_shift_table``. No buffers.
    """

    def __init__(self, cfg: DiTConfig | str | None = None, kernels: bool | str = True, *, attn_backend: str = "auto"):
        super().__init__()
        if cfg is None:
            cfg = DiTConfig()
        elif isinstance(cfg, str):
            cfg = DiTConfig.from_flavor(cfg)
        elif not isinstance(cfg, DiTConfig):
            raise TypeError(f"cfg must be a DiTConfig or a flavor name, got {type(cfg).__name__}")
        self.cfg = cfg
        self.kernels = kernels
        self.attn_backend = attn_backend
        C = cfg.hidden_size
        self.x_embedder = PatchEmbed3D(cfg.patch_size, cfg.in_channels, C)
        self.t_embedder = TimestepEmbedder(C, cfg.frequency_embedding_size)
        self.fps_embedder = FpsEmbedder(C, cfg.frequency_embedding_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = TextEmbedder(cfg.text_dim, C, cfg.eps)
        self.blocks = nn.ModuleList(
            MUGDiTBlock(C, cfg.num_heads, cfg.mlp_ratio, cfg.rope_sections, cfg.rope_theta, cfg.eps)
            for _ in range(cfg.depth)
        )
        self.start_token = nn.Parameter(torch.empty(C))
        self.end_token = nn.Parameter(torch.empty(C))
        pt, ph, pw = cfg.patch_size
        self.final_layer = FinalLayer(C, pt * ph * pw, cfg.out_channels, cfg.eps)
        self.init_weights()

    # ------------------------------------------------------------------ initialization

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialize every parameter in place; a no-op on the meta device.

        Scheme of the DiT / PixArt / Open-Sora family the public model descends from:
        Xavier-uniform Linear weights and zero biases (the patch Conv3d as a Linear on
        flattened patches); N(0, 0.02) for the timestep/fps embedders, ``t_block`` and the
        caption projection; ``scale_shift_table`` ~ N(0, 1/C); start/end tokens N(0, 0.02);
        norm weights 1; the cross-attention output projections and the final Linear zero,
        so a fresh model predicts 0 and each block starts close to identity in its
        cross-attention branch.

        Args:
            generator: optional ``torch.Generator`` (on the parameters' device) for
                reproducible initialization.
        """
        if self.start_token.is_meta:
            return
        g = dict(generator=generator) if generator is not None else {}
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, **g)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1), **g)
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (*self.t_embedder.mlp[0::2], *self.fps_embedder.mlp[0::2], self.t_block[1],
                    self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):  # fmt: skip
            nn.init.normal_(lin.weight, std=0.02, **g)
        C = self.cfg.hidden_size
        for blk in self.blocks:
            nn.init.normal_(blk.scale_shift_table, std=C**-0.5, **g)
            for norm in (blk.attn.q_norm, blk.attn.k_norm, blk.cross_attn.q_norm, blk.cross_attn.k_norm):
                nn.init.ones_(norm.weight)
            nn.init.zeros_(blk.cross_attn.proj.weight)
            nn.init.zeros_(blk.cross_attn.proj.bias)
        nn.init.normal_(self.start_token, std=0.02, **g)
        nn.init.normal_(self.end_token, std=0.02, **g)
        nn.init.normal_(self.final_layer.scale_shift_table, std=C**-0.5, **g)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ------------------------------------------------------------------ helpers

    @property
    def kernels(self) -> bool | str:
        """What was asked for (see the class docstring); :attr:`backend` is what the ops get."""
        return self._kernels

    @kernels.setter
    def kernels(self, value: bool | str) -> None:
        self.backend = resolve_backend(value)
        self._kernels = value

    @property
    def dtype(self) -> torch.dtype:
        """The parameter dtype (inputs are cast to it, as the public forward does)."""
        return self.x_embedder.proj.weight.dtype

    @classmethod
    def from_released(cls, path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                      kernels: bool = True) -> MUGDiT:
        """The released DiT (``MUG-V-inference/dit.pt``, or its directory, or an in-memory state
        dict): the config inferred from the shapes (hidden size, depth, ``heads = hidden / 72``,
        text width; a named flavor when it matches one, else a custom config), built on the meta
        device, every tensor cast to ``dtype`` on ``device`` and assigned (strict).

        Raises:
            FileNotFoundError: no ``dit.pt``. ValueError: not a MUG-V DiT state dict (the message
                lists what the file holds), or mismatched keys/shapes.
        """
        from mugv.models.released import load_released_dit

        return load_released_dit(path, device=device, dtype=dtype, kernels=kernels)

    def num_params(self) -> int:
        """Total parameter count (works on the meta device)."""
        return sum(p.numel() for p in self.parameters())

    def patch_grid(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """Token grid ``(Nt, Nh, Nw)`` of a latent ``(T, H, W)``: ceil-divided by the patch
        (the public code zero-pads sizes that are not multiples)."""
        pt, ph, pw = self.cfg.patch_size
        return (-(-T // pt), -(-H // ph), -(-W // pw))

    def _check_latent(self, name: str, x: Tensor, ndim: int) -> None:
        _tensor(name, x, ndim)
        if not (x.dtype.is_floating_point):
            raise TypeError(f"{name} must be a floating tensor, got dtype {x.dtype}")
        c = x.shape[-4]
        if c != self.cfg.in_channels:
            raise ValueError(
                f"{name} has {c} latent channels at dim {x.dim() - 4}; this DiT expects in_channels={self.cfg.in_channels} "
                f"(shape {tuple(x.shape)})"
            )
        if min(x.shape[-3:]) <= 0:
            raise ValueError(f"{name} must have T, H, W >= 1, got shape {tuple(x.shape)}")

    def _check_text(self, name: str, y: Tensor) -> None:
        if y.shape[-1] != self.cfg.text_dim:
            raise ValueError(
                f"{name} has {y.shape[-1]} features per token; this DiT expects text_dim={self.cfg.text_dim} "
                f"(shape {tuple(y.shape)})"
            )
        if not y.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got dtype {y.dtype}")

    def _frame_indices(self, name: str, fi: Tensor | None, Nt: int, device) -> Tensor:
        """``[Nt + 2]`` long frame positions (start, frames, end), clamped like the public table."""
        if fi is None:
            fi = torch.arange(Nt + 2, device=device)
        else:
            _tensor(name, fi, 1)
            _int_tensor(name, fi)
            if fi.shape[0] != Nt + 2:
                raise ValueError(
                    f"{name} must have T + 2 = {Nt + 2} entries (start token, {Nt} latent frames, end token), "
                    f"got {fi.shape[0]}"
                )
        fi = fi.to(device=device, dtype=torch.long)
        if self.cfg.rope_max_time is not None:
            fi = fi.clamp(0, self.cfg.rope_max_time - 1)
        return fi

    @staticmethod
    def _positions(fi: Tensor, Nt: int, Nh: int, Nw: int) -> Tensor:
        """RoPE positions ``[Nt*Nh*Nw + 2, 3]`` int32 in columns (h, w, t) of one clip: the
        frames take ``fi[1:-1]`` in time, the start token (h=0, w=0, t=fi[0]) and the end
        token (h=Nh-1, w=Nw-1, t=fi[-1]) (public ``get_freq_cis``)."""
        dev = fi.device
        h = torch.arange(Nh, device=dev).view(1, Nh, 1).expand(Nt, Nh, Nw)
        w = torch.arange(Nw, device=dev).view(1, 1, Nw).expand(Nt, Nh, Nw)
        t = fi[1:-1].view(Nt, 1, 1).expand(Nt, Nh, Nw)
        grid = torch.stack([h, w, t], dim=-1).reshape(-1, 3)  # [Nt*Nh*Nw, 3]
        start = torch.stack([fi.new_zeros(()), fi.new_zeros(()), fi[0]])[None]
        end = torch.stack([fi.new_full((), Nh - 1), fi.new_full((), Nw - 1), fi[-1]])[None]
        return torch.cat([start, grid, end]).to(torch.int32)

    def _embed_time(self, timestep: Tensor, fps: Tensor) -> Tensor:
        """``[n]`` timesteps and fps -> ``t_emb [2n, C]``: rows ``:n`` for the timesteps,
        rows ``n:`` for timestep 0 (``t0``), both plus the fps embedding."""
        t = self.t_embedder(torch.cat([timestep, torch.zeros_like(timestep)]))  # [2n, C]
        return t + self.fps_embedder(fps).repeat(2, 1)  # [2n, C]

    def _unpatchify(self, tokens: Tensor, grid: tuple[int, int, int], size: tuple[int, int, int]) -> Tensor:
        """``tokens [..., Nt*Nh*Nw, pt*ph*pw*C_out]`` -> ``[..., C_out, T, H, W]`` cropped to ``size``
        (feature order (pt, ph, pw, C_out), public ``unpatchify``)."""
        Nt, Nh, Nw = grid
        pt, ph, pw = self.cfg.patch_size
        Co = self.cfg.out_channels
        lead = tokens.shape[:-2]
        x = tokens.reshape(-1, Nt, Nh, Nw, pt, ph, pw, Co)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(-1, Co, Nt * pt, Nh * ph, Nw * pw)
        T, H, W = size
        return x[:, :, :T, :H, :W].reshape(*lead, Co, T, H, W)

    # ------------------------------------------------------------------ packed core

    def _core(
        self,
        tokens: list[Tensor],
        grids: list[tuple[int, int, int]],
        t_emb: Tensor,
        noised: list[Tensor | None],
        frame_indices: list[Tensor],
        text: Tensor,
        text_seqlens: list[int],
    ) -> list[Tensor]:
        """Run the blocks on ``n`` clips packed into one sequence.

        Args:
            tokens: ``n`` tensors ``[N_i, C]``, the patch-embedded clips.
            grids: ``n`` token grids ``(Nt, Nh, Nw)`` with ``N_i = Nt * Nh * Nw``.
            t_emb: ``[2n, C]`` from :meth:`_embed_time`.
            noised: per clip ``[Nt]`` bool (True: a noised frame, timestep modulation;
                False: a conditioning frame, ``t0``), or None for all noised.
            frame_indices: per clip ``[Nt + 2]`` long.
            text: ``[L, C]`` embedded captions, packed; ``text_seqlens`` their ``n`` lengths.

        Returns:
            ``n`` tensors ``[N_i, prod(patch) * C_out]`` (start/end tokens removed).
        """
        n, dev = len(tokens), t_emb.device
        seqlens = [t.shape[0] + 2 for t in tokens]
        pieces, index, positions = [], [], []
        for i, (x, (Nt, Nh, Nw)) in enumerate(zip(tokens, grids)):
            pieces += [self.start_token[None].to(x.dtype), x, self.end_token[None].to(x.dtype)]
            row = torch.full((Nt, Nh * Nw), i, dtype=torch.int32, device=dev)
            if noised[i] is not None:
                row = torch.where(noised[i].to(dev)[:, None], row, n + i)  # conditioning frames: t0 row
            cond = torch.full((1,), n + i, dtype=torch.int32, device=dev)  # start/end: t0 row
            index += [cond, row.flatten(), cond]
            positions.append(self._positions(frame_indices[i], Nt, Nh, Nw))
        x = torch.cat(pieces)[None]  # [1, N, C]
        cu = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        text_cu = torch.tensor([0, *torch.tensor(text_seqlens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        batch = PackedBatch(
            t_mlp=self.t_block(t_emb),  # [2n, 6C]
            index=torch.cat(index)[None],  # [1, N]
            positions=torch.cat(positions),  # [N, 3]
            cu_seqlens=cu, max_seqlen=max(seqlens), text=text, text_cu_seqlens=text_cu, text_max_seqlen=max(text_seqlens),
            backend=self.backend, attn_backend=self.attn_backend,
        )  # fmt: skip
        for i, block in enumerate(self.blocks):
            with nvtx_range(f"dit.block.{i}"):  # a shared no-op unless MUGV_NVTX=1
                x = block(x, batch)  # [1, N, C]
        out = self.final_layer(x, t_emb, batch)[0]  # [N, prod(patch) * C_out]
        return [o[1:-1] for o in out.split(seqlens)]

    # ------------------------------------------------------------------ public forward

    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        fps: Tensor | None = None,
        frame_indice: Tensor | None = None,
        **kwargs,
    ) -> Tensor:
        """Public-compatible forward (``MUGDiT.forward`` of ``mug_v/dit/model.py``).

        Args:
            x: ``[B, in_channels, T, H, W]`` latents (any float dtype; cast to the
                parameter dtype). Sizes that are not multiples of the patch are zero-padded
                and the output cropped back, as the public code does.
            timestep: ``[B]`` diffusion time in ``[0, 1000]`` (cast to the parameter dtype first).
            y: ``[B, 1, L, text_dim]`` (or ``[B, L, text_dim]``) caption states.
            mask: ``[B', L]`` (or ``[B', 1, L]``, ``[B', 1, 1, L]``) nonzero for valid caption
                tokens, ``B'`` dividing ``B``; None: all ``L`` tokens valid. Each caption
                needs at least one valid token.
            x_mask: ``[B, Nt]`` bool per latent frame: True = noised (timestep
                modulation), False = conditioning frame (image-to-video, ``t0``
                modulation). None: every frame noised. The start/end tokens always use
                ``t0`` (public semantics; the public code requires ``x_mask``, and with an
                all-True mask it equals ``x_mask=None`` here).
            fps: ``[B']`` or scalar frame rate, ``B'`` dividing ``B`` (required).
            frame_indice: ``[B', Nt + 2]`` integer temporal RoPE positions of (start token,
                frames, end token), ``B'`` dividing ``B``; None: ``0 .. Nt + 1``.
            **kwargs: ignored (the public pipeline passes ``height``, ``width``, ``num_frames``).

        Returns:
            ``[B, 2 * in_channels, T, H, W]`` fp32 (velocity in the first ``in_channels``).

        Raises:
            TypeError: a non-tensor or wrong dtype (float ``frame_indice``).
            ValueError: wrong rank; latent channels != ``in_channels``; ``text_dim``
                mismatch; batch sizes that do not match; ``x_mask`` not ``[B, Nt]``;
                ``frame_indice`` not ``Nt + 2`` long; missing ``fps``; an empty caption.
        """
        self._check_latent("x", x, 5)
        B, _, T, H, W = x.shape
        Nt, Nh, Nw = grid = self.patch_grid(T, H, W)
        dtype, dev = self.dtype, x.device
        # --- timestep / fps: [B]
        _tensor("timestep", timestep, (0, 1))
        timestep = timestep.reshape(-1).to(device=dev, dtype=dtype)
        if timestep.shape[0] == 1 and B > 1:
            timestep = timestep.expand(B)
        if timestep.shape[0] != B:
            raise ValueError(f"timestep must be [B] with B={B}, got shape {tuple(timestep.shape)}")
        if fps is None:
            raise ValueError("fps is required: a [B] (or scalar) tensor of frame rates, as in the public MUG-V forward")
        _tensor("fps", fps, (0, 1))
        fps = _per_sample("fps", fps.reshape(-1).to(dev), B)  # [B]
        # --- image-to-video mask: [B, Nt] bool
        if x_mask is not None:
            _tensor("x_mask", x_mask, 2)
            if tuple(x_mask.shape) != (B, Nt):
                raise ValueError(f"x_mask must be [B, Nt] = {(B, Nt)} (one flag per latent frame), got {tuple(x_mask.shape)}")
            x_mask = x_mask.to(dev) != 0
        # --- frame positions: [B, Nt + 2]
        if frame_indice is not None:
            _tensor("frame_indice", frame_indice, (1, 2))
            fi = _per_sample("frame_indice", frame_indice.reshape(-1, frame_indice.shape[-1]), B)
            fis = [self._frame_indices("frame_indice", fi[b], Nt, dev) for b in range(B)]
        else:
            fis = [self._frame_indices("frame_indice", None, Nt, dev)] * B
        # --- captions: packed [L_total, text_dim] with per-sample lengths
        _tensor("y", y, (3, 4))
        self._check_text("y", y)
        if y.dim() == 4:
            if y.shape[1] != 1:
                raise ValueError(f"y must be [B, 1, L, text_dim] or [B, L, text_dim], got {tuple(y.shape)}")
            y = y[:, 0]
        if y.shape[0] != B:
            raise ValueError(f"y must have the batch size of x ({B}), got {y.shape[0]}")
        L = y.shape[1]
        y = y.to(device=dev, dtype=dtype)
        if mask is not None:
            _tensor("mask", mask, (2, 3, 4))
            mask = mask.reshape(mask.shape[0], -1)  # [B', 1, 1, L] / [B', 1, L] -> [B', L]
            if mask.shape[-1] != L:
                raise ValueError(f"mask must be [B, L] with L={L} caption tokens, got {tuple(mask.shape)}")
            keep = _per_sample("mask", mask.to(dev), B) != 0  # [B, L]
            text_seqlens = keep.sum(1).tolist()
            text = y[keep]  # [L_total, text_dim]
        else:
            text_seqlens = [L] * B
            text = y.reshape(B * L, -1)
        if min(text_seqlens) <= 0:
            raise ValueError(f"every caption needs at least one valid token; got caption lengths {text_seqlens}")
        # --- embeddings
        t_emb = self._embed_time(timestep, fps)  # [2B, C]
        text = self.y_embedder(text)  # [L_total, C]
        tokens = self.x_embedder(x.to(dtype))  # [B, Nt*Nh*Nw, C]
        out = self._core(
            list(tokens.unbind(0)), [grid] * B, t_emb,
            [x_mask[b] if x_mask is not None else None for b in range(B)], fis, text, text_seqlens,
        )  # fmt: skip  # B x [Nt*Nh*Nw, prod(patch) * C_out]
        return self._unpatchify(torch.stack(out), grid, (T, H, W)).float()  # [B, C_out, T, H, W]

    def forward_packed(
        self,
        latents: Sequence[Tensor],
        timestep: Tensor,
        text: Sequence[Tensor] | Tensor,
        *,
        fps: Tensor,
        text_cu_seqlens: Tensor | None = None,
        x_mask: Sequence[Tensor | None] | None = None,
        frame_indice: Sequence[Tensor | None] | None = None,
    ) -> list[Tensor]:
        """Several clips of different sizes and their captions in one packed call.

        All clips are patch-embedded, wrapped in start/end tokens and concatenated into
        one sequence (THD layout); self-attention runs per clip and cross-attention per
        (clip, caption) pair through ``cu_seqlens``, and adaLN picks each token's
        modulation by index. The result equals calling :meth:`forward` on each clip alone.

        Args:
            latents: ``n`` tensors ``[in_channels, T_i, H_i, W_i]``.
            timestep: ``[n]`` (or scalar) diffusion times in ``[0, 1000]``.
            text: ``n`` caption tensors ``[L_i, text_dim]``, or one packed
                ``[sum L_i, text_dim]`` tensor with ``text_cu_seqlens``.
            fps: ``[n]`` (or scalar) frame rates.
            text_cu_seqlens: ``[n + 1]`` int offsets into a packed ``text``.
            x_mask: per clip ``[Nt_i]`` bool (True = noised frame) or None (all noised).
            frame_indice: per clip ``[Nt_i + 2]`` integer temporal positions or None
                (``0 .. Nt_i + 1``).

        Returns:
            ``n`` tensors ``[2 * in_channels, T_i, H_i, W_i]`` fp32.

        Raises:
            TypeError / ValueError: as :meth:`forward`, per clip (named ``latents[i]`` etc.),
                and list lengths that differ from ``n``.
        """
        if isinstance(latents, Tensor) or not isinstance(latents, Sequence) or len(latents) == 0:
            raise TypeError("latents must be a non-empty list of [in_channels, T, H, W] tensors")
        n, dtype = len(latents), self.dtype
        for i, z in enumerate(latents):
            self._check_latent(f"latents[{i}]", z, 4)
        dev = latents[0].device

        def per_clip(name: str, v: Tensor) -> Tensor:
            _tensor(name, v, (0, 1))
            v = v.reshape(-1).to(dev)
            if v.shape[0] == 1 and n > 1:
                v = v.expand(n)
            if v.shape[0] != n:
                raise ValueError(f"{name} must have one entry per clip ({n}), got shape {tuple(v.shape)}")
            return v

        timestep = per_clip("timestep", timestep).to(dtype)
        fps = per_clip("fps", fps)

        def listed(name: str, v):
            if v is None:
                return [None] * n
            if isinstance(v, Tensor) or len(v) != n:
                raise ValueError(f"{name} must be a list with one entry (or None) per clip ({n})")
            return list(v)

        x_masks, fis_in = listed("x_mask", x_mask), listed("frame_indice", frame_indice)
        # --- captions
        if isinstance(text, Tensor):
            _tensor("text", text, 2)
            if text_cu_seqlens is None:
                raise ValueError("a packed text [sum L_i, text_dim] needs text_cu_seqlens [n + 1]")
            _tensor("text_cu_seqlens", text_cu_seqlens, 1)
            cu = text_cu_seqlens.tolist()
            if len(cu) != n + 1 or cu[0] != 0 or cu[-1] != text.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(
                    f"text_cu_seqlens must be [n + 1] = [{n + 1}] non-decreasing offsets from 0 to {text.shape[0]}, got {cu}"
                )
            text_seqlens = [b - a for a, b in zip(cu, cu[1:])]
            self._check_text("text", text)
        else:
            if text_cu_seqlens is not None:
                raise ValueError("text_cu_seqlens goes with a packed text tensor, not with a list of captions")
            texts = listed("text", text)
            for i, c in enumerate(texts):
                _tensor(f"text[{i}]", c, 2)
                self._check_text(f"text[{i}]", c)
            text_seqlens = [c.shape[0] for c in texts]
            text = torch.cat([c.to(device=dev, dtype=dtype) for c in texts])
        if min(text_seqlens) <= 0:
            raise ValueError(f"every caption needs at least one token; got caption lengths {text_seqlens}")
        # --- per-clip tokens, masks, positions
        tokens, grids, noised, fis = [], [], [], []
        for i, z in enumerate(latents):
            if z.device != dev:
                raise ValueError(f"latents[{i}] is on {z.device} but latents[0] is on {dev}")
            grid = self.patch_grid(*z.shape[-3:])
            tokens.append(self.x_embedder(z[None].to(dtype))[0])  # [N_i, C]
            grids.append(grid)
            m = x_masks[i]
            if m is not None:
                _tensor(f"x_mask[{i}]", m, 1)
                if m.shape[0] != grid[0]:
                    raise ValueError(f"x_mask[{i}] must have Nt = {grid[0]} entries (one per latent frame), got {m.shape[0]}")
                m = m.to(dev) != 0
            noised.append(m)
            fis.append(self._frame_indices(f"frame_indice[{i}]", fis_in[i], grid[0], dev))
        t_emb = self._embed_time(timestep, fps)  # [2n, C]
        text = self.y_embedder(text.to(device=dev, dtype=dtype))  # [L_total, C]
        out = self._core(tokens, grids, t_emb, noised, fis, text, text_seqlens)
        return [self._unpatchify(o, g, tuple(z.shape[-3:])).float() for o, g, z in zip(out, grids, latents)]
