"""MUG-V models: the video DiT (:class:`MUGDiT`, public-checkpoint compatible) and the
checkpoint helpers; the video VAE is exported here too."""

from mugv.models.checkpoint import (
    CheckpointMismatchError,
    UnsafePickleError,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from mugv.models.dit import FLAVORS, DiTConfig, MUGDiT
from mugv.models.released import dit_config_from_state_dict, load_released_dit
from mugv.models.vae import DiagonalGaussian, VAEConfig, VideoVAE
from mugv.models.vae_released import ReleasedVideoVAE
from mugv.models.vae_spatial import SpatialVAE

__all__ = [
    "FLAVORS",
    "CheckpointMismatchError",
    "DiagonalGaussian",
    "DiTConfig",
    "MUGDiT",
    "ReleasedVideoVAE",
    "SpatialVAE",
    "UnsafePickleError",
    "VAEConfig",
    "VideoVAE",
    "dit_config_from_state_dict",
    "load_checkpoint",
    "load_released_dit",
    "read_state_dict",
    "save_checkpoint",
]
