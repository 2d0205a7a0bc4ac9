"""MUG-V models: the video DiT (:class:`MUGDiT`, public-checkpoint compatible) and the
checkpoint helpers; the video VAE is exported here too."""

from mugv.models.checkpoint import CheckpointMismatchError, load_checkpoint, read_state_dict, save_checkpoint
from mugv.models.dit import FLAVORS, DiTConfig, MUGDiT
from mugv.models.vae import DiagonalGaussian, VAEConfig, VideoVAE

__all__ = [
    "FLAVORS",
    "CheckpointMismatchError",
    "DiagonalGaussian",
    "DiTConfig",
    "MUGDiT",
    "VAEConfig",
    "VideoVAE",
    "load_checkpoint",
    "read_state_dict",
    "save_checkpoint",
]
