"""An independent, plain-PyTorch re-implementation of the public MUG-V inference pipeline, the
yardstick for ``VideoVAE.from_released`` and :class:`mugv.pipeline.MUGVPipeline`.

Written from reading, in ``Shopee-MUG/MUG-V``:

* ``mug_v/encoder/vae/vae.py`` (``MUGAutoencoderKL``: frames through a 2D VAE in micro-batches
  of 4, features times 0.18215; ``MUGAutoencoderPipeline``: first-frame repetition for ``8k+1``
  clips, ``micro_frame_size`` chunks, ``posterior.sample()``, ``(z - shift) / scale``);
* ``mug_v/encoder/vae/vae2d/vae.py`` (the truncated ``Encoder.forward`` / ``Decoder.forward``);
* ``mug_v/scheduler/rectified_flow.py`` (``RFlow.sample``: ``timestep_transform``, the
  ``randn_like`` draws, the masks, CFG, the Euler update);
* ``infer_pipeline.py`` and ``mug_v/utils.py`` (seeding, the 8-frame reference image, the first
  noise draw, decoding latents ``1:`` and prepending the image, the 720p/duration tables).

The 2D VAE here is diffusers' own ``Encoder``/``Decoder`` (which the public ``vae2d`` copies) with
the public truncated forward written out, so its state dict has the released key layout,
unused layers included. The temporal VAE is the test oracle ``_mugv_public_vae.PubTemporalVAE``
and the DiT ``_mugv_public_ref.PublicMUGDiT``. Random numbers come from the *global* generators,
seeded as the public ``set_random_seed``; the posterior draw is ``torch.randn`` on the CPU, as
there. Nothing here imports :mod:`mugv`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.autoencoders.vae import Decoder, Encoder

from tests.stack._mugv_public_vae import PubTemporalVAE

# mug_v/utils.py
ASPECT_RATIO_720P = {"9:16": (720, 1280), "3:4": (832, 1110), "1:1": (960, 960), "4:3": (1108, 832),
                     "16:9": (1280, 720)}
NUM_FRAMES_MAP = {"5s": 105, "3s": 73}
NEGATIVE = ("ugly, blurry, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
            "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, "
            "blurry")
LATENT_MEAN = (-0.0194091796875, 0.09619140625, -0.796875, 0.1591796875, -0.2578125, 0.359375, -0.3203125,
               -0.287109375, -0.0069580078125, 0.3046875, 0.310546875, -0.451171875, -0.1728515625, 0.369140625,
               0.2177734375, -3.075599670410156e-05, 0.1630859375, -0.267578125, -0.1962890625, -0.1298828125,
               -0.28515625, -0.515625, 0.5859375, -0.34375)
LATENT_STD = (0.8817, 0.6523, 0.9152, 1.2117, 3.3516, 0.7528, 0.8177, 0.8637, 0.9075, 2.8875, 0.8980, 1.1202,
              1.0003, 2.5163, 0.6652, 1.2573, 0.7279, 1.0777, 1.5159, 0.8680, 1.1859, 1.0484, 2.4750, 1.5881)


class _AutoencoderKLP(nn.Module):
    """``AutoencoderKL(use_quant_conv=False, use_post_quant_conv=False)`` of ``vae2d``."""

    def __init__(self, block_out_channels, layers_per_block, groups):
        super().__init__()
        n = len(block_out_channels)
        self.encoder = Encoder(in_channels=3, out_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               norm_num_groups=groups, double_z=True)
        self.decoder = Decoder(in_channels=4, out_channels=3, up_block_types=("UpDecoderBlock2D",) * n,
                               block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                               norm_num_groups=groups)

    def encode(self, x):  # vae2d Encoder.forward: stops after the mid-block
        e = self.encoder
        h = e.conv_in(x)
        for blk in e.down_blocks:
            h = blk(h)
        return e.mid_block(h)

    def decode(self, z):  # vae2d Decoder.forward without conv_in
        d = self.decoder
        h = d.mid_block(z, None)
        h = h.to(next(iter(d.up_blocks.parameters())).dtype)
        for blk in d.up_blocks:
            h = blk(h, None)
        return d.conv_out(d.conv_act(d.conv_norm_out(h)))


class PubSpatialVAE(nn.Module):
    """``MUGAutoencoderKL`` (micro_batch_size 4, scaling 0.18215)."""

    def __init__(self, block_out_channels=(128, 256, 512, 512), layers_per_block=2, groups=32, micro_batch_size=4):
        super().__init__()
        self.module = _AutoencoderKLP(tuple(block_out_channels), layers_per_block, groups)
        self.micro_batch_size, self.scaling_factor = micro_batch_size, 0.18215

    def _frames(self, fn, x):
        B, C, T, H, W = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(B * T, C, H, W)
        out = torch.cat([fn(x[i:i + self.micro_batch_size]) for i in range(0, x.shape[0], self.micro_batch_size)])
        return out.reshape(B, T, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    def encode(self, x):
        return self._frames(lambda v: self.module.encode(v).mul(self.scaling_factor), x)

    def decode(self, x):
        return self._frames(lambda v: self.module.decode(v / self.scaling_factor), x)


class PubVAEPipeline(nn.Module):
    """``MUGAutoencoderPipeline`` with its state-dict layout: ``spatial_vae.module.*``,
    ``temporal_vae.*``, ``scale``, ``shift``, ``logvar``."""

    def __init__(self, block_out_channels=(128, 256, 512, 512), layers_per_block=2, groups=32, filters=128,
                 num_res_blocks=4, channel_multipliers=(1, 2, 2, 4), temporal_groups=32, micro_frame_size=48,
                 mean=LATENT_MEAN, std=LATENT_STD):
        super().__init__()
        self.spatial_vae = PubSpatialVAE(block_out_channels, layers_per_block, groups)
        self.temporal_vae = PubTemporalVAE(in_out_channels=block_out_channels[-1], latent_embed_dim=24,
                                           embed_dim=24, filters=filters, num_res_blocks=num_res_blocks,
                                           channel_multipliers=channel_multipliers,
                                           temporal_downsample=(True, True, True), num_groups=temporal_groups)
        self.micro_frame_size = micro_frame_size
        self.register_buffer("scale", torch.tensor(std)[None, :, None, None, None])
        self.register_buffer("shift", torch.tensor(mean)[None, :, None, None, None])
        self.logvar = nn.Parameter(torch.ones(size=()) * 4.0)

    def encode(self, x, sample=True):
        x_z = self.spatial_vae.encode(x)
        tdf = self.temporal_vae.tdf
        if x_z.shape[2] % tdf == 1:
            x_z = torch.cat([x_z[:, :, :1].repeat(1, 1, tdf - 1, 1, 1), x_z], dim=2)
        zs = []
        for i in range(0, x_z.shape[2], self.micro_frame_size):
            post = self.temporal_vae.encode(x_z[:, :, i:i + self.micro_frame_size])
            if sample:  # DiagonalGaussianDistribution.sample: randn on the CPU, then moved
                zs.append(post.mean + post.std * torch.randn(post.mean.shape).to(device=post.mean.device,
                                                                                  dtype=post.mean.dtype))
            else:
                zs.append(post.mean)
        z = torch.cat(zs, dim=2)
        return (z - self.shift) / self.scale

    def decode(self, z, num_frames):
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        step = self.micro_frame_size // self.temporal_vae.tdf
        outs = []
        for i in range(0, z.shape[2], step):
            outs.append(self.temporal_vae.decode(z[:, :, i:i + step], num_frames=min(self.micro_frame_size,
                                                                                     num_frames)))
            num_frames -= self.micro_frame_size
        return self.spatial_vae.decode(torch.cat(outs, dim=2))

    def latent_frames(self, num_frames):  # get_latent_size[0]
        m, tdf = self.micro_frame_size, self.temporal_vae.tdf
        rest = num_frames % m
        return (m // tdf) * (num_frames // m) + ((rest + (tdf - rest % tdf) % tdf) // tdf if rest else 0)


def timestep_transform(t, height, width, num_frames, num_timesteps=1000):
    t = t / num_timesteps
    ratio = (height * width / (512 * 512)).sqrt() * (num_frames / 1).sqrt() * 1.0
    return ratio * t / (1 + (ratio - 1) * t) * num_timesteps


def rflow_sample(model, z, y, mask, additional_args, x_mask, num_steps=25, cfg=4.0, device="cpu"):
    """``RFlow.sample`` with the text already encoded: ``y [2B, 1, L, D]`` (cond, then the
    negative prompt), ``mask [2B, L]``; ``x_mask [B, T]`` float (1 = generated frame); the model
    takes ``(x, timestep, y, mask, x_mask, fps, frame_indice)``."""
    model_args = dict(y=y, mask=mask)
    model_args.update(additional_args)
    timesteps = [(1.0 - i / num_steps) * 1000 for i in range(num_steps)]
    timesteps = [torch.tensor([t] * z.shape[0], device=device) for t in timesteps]
    timesteps = [timestep_transform(t, additional_args["height"], additional_args["width"],
                                    additional_args["num_frames"]) for t in timesteps]
    noise_added = torch.zeros_like(x_mask, dtype=torch.bool) | (x_mask == 1)

    def add_noise(x0, noise, t):
        tp = (1 - t.float() / 1000)[:, None, None, None, None].repeat(1, *noise.shape[1:])
        return tp * x0 + (1 - tp) * noise

    x0 = z.clone()
    z = torch.where(x_mask[:, None, :, None, None].to(torch.bool), add_noise(x0, torch.randn_like(x0), timesteps[0]),
                    x0)
    for i, t in enumerate(timesteps):
        mask_t = x_mask * 1000
        x0 = z.clone()
        x_noise = add_noise(x0, torch.randn_like(x0), t)
        upper = mask_t >= t.unsqueeze(1)
        model_args["x_mask"] = upper.repeat(2, 1)
        z = torch.where((upper & ~noise_added)[:, None, :, None, None], x_noise, x0)
        noise_added = upper
        pred = model(torch.cat([z, z], 0), torch.cat([t, t], 0), model_args["y"], model_args["mask"],
                     model_args["x_mask"], model_args["fps"], model_args["frame_indice"]).chunk(2, dim=1)[0]
        pred_cond, pred_uncond = pred.chunk(2, dim=0)
        v = pred_uncond + cfg * (pred_cond - pred_uncond)
        dt = (timesteps[i] - timesteps[i + 1] if i < len(timesteps) - 1 else timesteps[i]) / 1000
        z = z + v * dt[:, None, None, None, None]
        z = torch.where(upper[:, None, :, None, None], z, x0)
    return z


def generate(dit, vae, y, mask, *, image=None, num_frames=105, height=1280, width=720, steps=25, cfg=4.0, fps=30,
             seed=42, dtype=torch.float32, device="cpu"):
    """``MUGDiTPipeline._run_inference`` from the seed on, with ``image [3, 1, H, W]`` in [-1, 1]
    already read (``read_image_from_path``), ``y``/``mask`` the encoded ``[prompt + suffix,
    negative]``. ``image=None`` is our text-to-video reading of it (all-ones mask, every latent
    decoded). Returns ``(latents [1, 24, T, h, w] float32, video [3, T, H, W])``."""
    torch.manual_seed(seed)
    L = vae.latent_frames(num_frames)
    args = dict(fps=torch.tensor([fps], device=device, dtype=dtype),
                height=torch.tensor([height], device=device, dtype=dtype),
                width=torch.tensor([width], device=device, dtype=dtype),
                num_frames=torch.tensor([L], device=device, dtype=dtype),
                frame_indice=torch.tensor([range(L + 2)], device=device, dtype=torch.long))
    ref = None
    if image is not None:
        ref = vae.encode(image.repeat(1, 8, 1, 1)[None].to(device, dtype))[0]
    z = torch.randn(1, 24, L, height // 8, width // 8, device=device, dtype=dtype)
    masks = torch.ones((1, L), dtype=torch.float, device=device)
    if ref is not None:
        masks[:, :1] = 0
        z[0, :, :1] = ref
    samples = rflow_sample(dit, z, y, mask, args, masks, num_steps=steps, cfg=cfg, device=device)
    if ref is None:
        return samples, vae.decode(samples.to(dtype), num_frames=num_frames)[0]
    video = vae.decode(samples[:, :, 1:].to(dtype), num_frames=num_frames - 1)
    video = torch.cat([image[None].to(video.dtype), video], dim=2)[0]
    return samples, video


def to_uint8(vid):
    """``save_video``'s conversion: ``[C, T, H, W]`` in [-1, 1] -> uint8 ``[T, H, W, C]``."""
    vid = vid.clone().clamp_(-1, 1).sub_(-1).div_(2)
    return vid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 3, 0).to("cpu", torch.uint8)
