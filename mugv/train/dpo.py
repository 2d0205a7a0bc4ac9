"""``mugv train-dpo``: preference optimization of the DiT, Diffusion-DPO adapted to rectified flow.

Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908, Eq. 14 and its reference code
``SalesforceAIResearch/DiffusionDPO``) with the flow-matching error in place of the
epsilon-prediction error. For a pair (preferred ``w``, rejected ``l``) with one caption, the
two clips share the time ``t`` and the noise ``eps``; with ``e(theta, x) = mean over the
elements of (v_theta(x_t, t) - (eps - x))^2`` (the per-sample flow MSE, all latent elements)::

    inside = -beta / 2 * ((e(theta, w) - e(theta, l)) - (e(ref, w) - e(ref, l)))
    loss   = -logsigmoid(inside)  (mean over pairs)  +  sft_weight * mean e(theta, w)

``ref`` is the frozen initial policy (``--init-from``; no gradients, its forward under
``no_grad`` on the same packed batch). At step 0 the policy is the reference, ``inside = 0``
and the loss is ``log 2``. ``inside`` is the implicit reward margin (logged as
``margin``); the fraction of pairs with ``inside > 0`` is the implicit accuracy.

``beta`` (default ``5000 / 3``): the reference code uses ``beta = 5000`` for SD1.5 on a
per-element mean epsilon MSE, the same normalization as ours. In rectified flow
``x_t = (1 - t) x + t eps``, so ``eps_hat - eps = (1 - t) (v_hat - v)`` at a fixed ``x_t``
and the epsilon error is ``(1 - t)^2`` times the velocity error. Matching the strength at
each ``t`` would need ``beta_v = 5000 (1 - t)^2``; its mean over the uniform training times
of SD1.5, ``5000 * E[(1 - t)^2] = 5000 / 3``, is the default (a derived value, not a tuned
one).

``--loss kto``: the unpaired variant (KTO, Ethayarajh et al. 2024, arXiv 2402.01306, in its
diffusion form, Li et al. 2024, arXiv 2404.04465): each clip has a like/dislike label and
the implicit reward ``r = -beta / 2 * (e(theta, x) - e(ref, x))``; with the reference point
``z = max(0, mean r)`` over the step's clips (detached; the batch estimate of KTO's KL term),
the loss is ``1 - sigmoid(r - z)`` for liked and ``1 - sigmoid(z - r)`` for disliked clips.

``pairs.csv`` (:func:`read_pairs`): columns ``prompt`` and, for each clip, a shard key of the
``--data`` shards (``preferred``, ``rejected``; a key is ``<shard file>:<key>``, or the bare
key where only one shard has it) or a video path (``preferred_path``, ``rejected_path``,
relative to the CSV's folder); for KTO ``key`` or ``path`` and ``label`` (1 = liked,
0 = disliked). Video files are decoded, fitted and encoded the way ``mugv preprocess`` made
the shards, with the VAE and text encoder their ``index.json`` names, each once, and cached
under ``<out>/pair_latents`` (:class:`PairVideoCache`); a row that names a video is
conditioned on its encoded ``prompt``, a row of shard clips on the preferred clip's stored
caption states. The two latents of a pair need one shape, since they share the noise.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.fsdp import FSDPModule

from mugv.config import ConfigError, DPOConfig
from mugv.data.shards import atomic_write_json, file_sha256, write_shard
from mugv.data.video import VIDEO_EXTENSIONS, decode_video, frames_to_tensor, make_buckets
from mugv.diffusion import add_noise, shift_ratio, velocity_target
from mugv.train.trainer import NonFiniteLossError, StepResult, Trainer, clip_randomness

__all__ = ["DPOTrainer", "PairRow", "PairVideoCache", "dpo_loss", "kto_loss", "read_pairs", "shard_keys", "train_dpo"]


def dpo_loss(e_w, e_l, e_ref_w, e_ref_l, beta: float):
    """Diffusion-DPO loss per pair and the implicit reward margin ``inside`` (see the module
    docstring); every argument ``[P]`` float. Returns ``(loss [P], inside [P])``."""
    inside = -0.5 * beta * ((e_w - e_l) - (e_ref_w - e_ref_l))
    return -F.logsigmoid(inside), inside


def kto_loss(e, e_ref, liked, beta: float, *, z=None):
    """KTO loss per clip and the implicit rewards (see the module docstring): ``e``, ``e_ref``
    ``[N]`` float, ``liked`` ``[N]`` bool; ``z`` the reference point (default: ``max(0, mean r)``
    over these clips; the trainer passes the mean over the whole step's clips, all ranks).
    Returns ``(loss [N], reward [N])``."""
    r = -0.5 * beta * (e - e_ref)
    z = r.detach().mean().clamp_min(0.0) if z is None else torch.as_tensor(z, dtype=r.dtype, device=r.device)
    loss = torch.where(liked, 1 - torch.sigmoid(r - z), 1 - torch.sigmoid(z - r))
    return loss, r


#: ``pairs.csv`` columns of a preferred / rejected / KTO clip: a shard key, or a video path.
_SIDES = {"preferred": ("preferred", "preferred_path"), "rejected": ("rejected", "rejected_path"),
          "key": ("key", "path")}


@dataclass(frozen=True)
class PairRow:
    """One row of ``pairs.csv``.

    Attributes:
        preferred: the preferred (or, for KTO, the labelled) clip: an index into the ``--data``
            shards, or a video file (a ``Path``).
        rejected: the rejected clip of a pair, the same kinds; None for a KTO row.
        liked: True for pairs; a KTO row's label.
        prompt: the ``prompt`` column ('' when absent).
        line: the CSV line (for error messages).
    """

    preferred: int | Path
    rejected: int | Path | None
    liked: bool
    prompt: str
    line: int

    @property
    def has_video(self) -> bool:
        return isinstance(self.preferred, Path) or isinstance(self.rejected, Path)


def shard_keys(entries: list[tuple[str, dict]]) -> dict[str, int | None]:
    """Names of the clips of a :class:`~mugv.data.shards.LatentDataset` for ``pairs.csv``:
    ``<shard file>:<key>`` for every clip, and the bare ``<key>`` where it is unique (a key
    found in several shards maps to None: ambiguous; ``mugv preprocess`` numbers the clips of
    each shard from ``0``)."""
    out: dict[str, int | None] = {}
    for i, (file, meta) in enumerate(entries):
        out[f"{file}:{meta['key']}"] = i
        out[meta["key"]] = None if meta["key"] in out else i
    return out


def read_pairs(path: str | Path, keys: dict[str, int | None], loss: str) -> list[PairRow]:
    """The rows of ``pairs.csv``.

    Columns: ``prompt`` and, per clip, a shard key (``preferred``, ``rejected``; for KTO
    ``key``) or a video path (``preferred_path``, ``rejected_path``; ``path``), one of the two
    per clip and row; KTO rows have a ``label`` (1 liked, 0 disliked). Shard keys are those of
    :func:`shard_keys`; relative video paths are relative to the CSV's folder. A row that
    names a video needs a ``prompt`` (it becomes the clip's caption).

    Raises:
        FileNotFoundError: no pairs file; a video path that names no file.
        ConfigError: no rows; missing columns (``key``/``path`` rows need ``--loss kto``); a
            row with neither a key nor a path for a clip, or both; an unknown or ambiguous
            shard key; a bad label; a video row without a prompt.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--pairs {path}: not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"--pairs {path}: no rows")
    cols = set(rows[0])

    def has(side: str) -> bool:
        return bool(cols & set(_SIDES[side]))

    def clip(r: dict, side: str, line: int) -> int | Path:
        kcol, pcol = _SIDES[side]
        k, v = (r.get(kcol) or "").strip(), (r.get(pcol) or "").strip()
        if bool(k) == bool(v):
            what = f"both a shard key ({kcol}) and" if k else f"neither a shard key ({kcol}) nor"
            raise ConfigError(f"--pairs {path} line {line}: {what} a video path ({pcol}) for the {side} clip; "
                              "give exactly one")
        if v:
            video = Path(v) if Path(v).is_absolute() else path.parent / v
            if not video.is_file():
                raise FileNotFoundError(f"--pairs {path} line {line}: {pcol} {v!r}: no such file ({video})")
            if not (r.get("prompt") or "").strip():
                raise ConfigError(f"--pairs {path} line {line}: a row with a video path needs a prompt (its caption)")
            return video
        if k not in keys:
            hint = f"; video files go in the {pcol} column" if Path(k).suffix.lower() in VIDEO_EXTENSIONS else ""
            raise ConfigError(f"--pairs {path} line {line}: shard key {k!r} not in the data{hint}")
        if keys[k] is None:
            raise ConfigError(f"--pairs {path} line {line}: shard key {k!r} is in several shards; "
                              f"write it as <shard file>:{k}")
        return keys[k]

    out = []
    if has("preferred") and has("rejected"):
        for n, r in enumerate(rows, 2):
            prompt = (r.get("prompt") or "").strip()
            out.append(PairRow(clip(r, "preferred", n), clip(r, "rejected", n), True, prompt, n))
    elif has("key") and "label" in cols and loss == "kto":
        for n, r in enumerate(rows, 2):
            if r["label"] not in ("0", "1"):
                raise ConfigError(f"--pairs {path} line {n}: label must be 1 (liked) or 0 (disliked), "
                                  f"got {r['label']!r}")
            out.append(PairRow(clip(r, "key", n), None, r["label"] == "1", (r.get("prompt") or "").strip(), n))
    else:
        raise ConfigError(f"--pairs {path}: expected columns prompt,preferred,rejected (or preferred_path,"
                          "rejected_path)" + (" or key,label (or path,label)" if loss == "kto" else "")
                          + f", got {sorted(cols)}")
    return out


class PairVideoCache:
    """Latents of the video files and caption states of the prompts that ``pairs.csv`` names,
    made the way ``mugv preprocess`` made the ``--data`` shards, each once, kept on disk.

    A video is decoded with PyAV (:func:`mugv.data.video.decode_video`) at the shards'
    ``fps``, fitted to the nearest of their resolution buckets (resize to cover, center
    crop), cut to its first ``n`` frames with ``n`` the longest of their ``num_frames`` that
    fits, and encoded by their VAE (``encode(...).mode()``, the posterior mean), stored in
    their ``latent_dtype``; a prompt is encoded by their text encoder
    (:func:`mugv.text.encode_caption`). The settings are those ``index.json`` records.

    Files: ``<root>/video_<sha>.safetensors`` (``latent [C, T, h, w]``) and
    ``video_<sha>.json`` (``height``, ``width``, ``fps``, ``num_frames``, ``source``), keyed by the
    SHA-256 of the video's bytes and of the settings, and ``<root>/text_<sha>.safetensors``
    (``text [L, D]``) keyed by the prompt and the text encoder. The VAE and the text encoder
    are loaded only when something is missing.

    Args:
        root: the cache directory (the trainer uses ``<out>/pair_latents``).
        index: the ``--data`` shards' ``index.json`` (``settings``, ``vae``, ``text_encoder``).
        device: where the VAE and the text encoder run.
        vae, text_encoder: already loaded models (tests); default: ``index["vae"]`` and
            :func:`mugv.text.load_text_encoder` of ``index["text_encoder"]``.

    Raises:
        ConfigError: the index records no preprocess settings or no VAE (shards not made by
            ``mugv preprocess``); on :meth:`video`, a clip shorter than the shortest
            ``num_frames``; a VAE or text encoder whose width differs from the shards'.
        VideoDecodeError: on :meth:`video`, a file PyAV cannot decode.
    """

    def __init__(self, root: str | Path, index: dict, *, device: torch.device, vae=None, text_encoder=None) -> None:
        settings = index.get("settings")
        if not settings:
            raise ConfigError("--pairs names video files, but the --data index records no preprocess settings "
                              "(shards not written by `mugv preprocess`); preprocess the clips or give shard keys")
        self.root, self.index, self.settings, self.device = Path(root), index, settings, device
        self._vae, self._text = vae, text_encoder
        self._mem: dict[str, tuple[torch.Tensor, dict] | torch.Tensor] = {}
        self.encoded = 0  # videos encoded (not found in the cache) by this object

    def _digest(self, *parts: str) -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(p.encode())
            h.update(b"\0")
        return h.hexdigest()[:24]

    def vae(self):
        if self._vae is None:
            from mugv.models.vae import VideoVAE

            vae_dir = self.settings.get("vae") or self.index.get("vae")
            if not vae_dir:
                raise ConfigError("--pairs names video files, but the --data index records no VAE")
            self._vae = VideoVAE.from_pretrained(vae_dir, device=self.device)
        self._vae.eval()
        if self._vae.config.latent_channels != int(self.index["latent_channels"]):
            raise ConfigError(f"the VAE has {self._vae.config.latent_channels} latent channels, the --data shards "
                              f"{self.index['latent_channels']}")
        return self._vae

    def text_encoder(self):
        if self._text is None:
            from mugv.text import load_text_encoder

            self._text = load_text_encoder(self.index["text_encoder"], device=self.device)
        if self._text.dim != int(self.index["text_dim"]):
            raise ConfigError(f"the text encoder is {self._text.dim}-d, the --data shards {self.index['text_dim']}-d")
        return self._text

    def video(self, path: Path) -> tuple[torch.Tensor, dict]:
        """``(latent float32 [C, T, h, w], meta)`` of a video file (``meta``: ``height``,
        ``width`` of its bucket in pixels, ``fps``, ``num_frames``, ``source``)."""
        key = self._digest(file_sha256(path), json.dumps(self.settings, sort_keys=True))
        if key in self._mem:
            return self._mem[key]  # type: ignore[return-value]
        f, fm = self.root / f"video_{key}.safetensors", self.root / f"video_{key}.json"
        if f.exists() and fm.exists():  # the JSON is written last: both present = complete
            lat, meta = load_file(str(f))["latent"].float(), json.loads(fm.read_text())
        else:
            lat, meta = self._encode_video(path)
            self.root.mkdir(parents=True, exist_ok=True)
            dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[self.settings.get("latent_dtype", "float32")]
            lat = lat.to(dtype)
            write_shard(f, {"latent": lat})
            atomic_write_json(fm, meta)
            lat = lat.float()
            self.encoded += 1
        self._mem[key] = (lat, meta)
        return lat, meta

    def _encode_video(self, path: Path) -> tuple[torch.Tensor, dict]:
        s = self.settings
        vae = self.vae()
        vid = decode_video(path, buckets=make_buckets(s["base_resolution"], tuple(s["aspect_ratios"])),
                           target_fps=s["fps"])
        fits = [n for n in s["num_frames"] if n <= len(vid.frames)]
        if not fits:
            raise ConfigError(f"{path}: {len(vid.frames)} frames at {vid.fps:.2f} fps, the shortest clip of the "
                              f"--data settings needs {min(s['num_frames'])}")
        n = max(fits)
        x = frames_to_tensor(vid.frames[:n])[None].to(self.device)
        with torch.no_grad():
            z = vae.encode(x).mode()[0].float().cpu()  # [C, T, h, w]
        return z, {"height": vid.bucket.height, "width": vid.bucket.width, "fps": float(vid.fps), "num_frames": n,
                   "source": str(path.resolve())}

    def text(self, prompt: str) -> torch.Tensor:
        """``float32 [L, D]`` caption states of a prompt."""
        name = self.index.get("text_encoder", "")
        key = self._digest("text", name, prompt)
        if key in self._mem:
            return self._mem[key]  # type: ignore[return-value]
        f = self.root / f"text_{key}.safetensors"
        if f.exists():
            t = load_file(str(f))["text"].float()
        else:
            from mugv.text import encode_caption

            t = encode_caption(self.text_encoder(), prompt)
            self.root.mkdir(parents=True, exist_ok=True)
            write_shard(f, {"text": t})
        self._mem[key] = t
        return t


@dataclass
class _Plan:
    indices: tuple[int, ...]
    global_tokens: int


class _RowSampler:
    """``rows_per_step`` rows of the pairs file per step, a fresh permutation each epoch
    (seeded by ``(seed, epoch)``), the same on every rank (rank ``r`` takes its slice)."""

    def __init__(self, n: int, per_step: int, seed: int, rank: int, world: int, tokens: list[int]) -> None:
        self.n, self.per_step, self.seed, self.rank, self.world, self.tokens = n, per_step, seed, rank, world, tokens
        self.pos = 0

    def next_step(self) -> _Plan:
        take = []
        for _ in range(self.per_step * self.world):
            epoch, i = divmod(self.pos, self.n)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**63))
            take.append(int(perm[i]))
            self.pos += 1
        mine = tuple(take[self.rank::self.world])
        return _Plan(mine, sum(self.tokens[i] for i in take))

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = int(state["pos"])


class DPOTrainer(Trainer):
    """:class:`~mugv.train.trainer.Trainer` with the preference loss (module docstring).

    The policy starts from ``cfg.init_from`` (required); the reference
    (:meth:`build_reference`) is a second model with the same weights, built and sharded
    the way the trainer builds the policy (under FSDP2 ``fully_shard`` on the same mesh),
    without gradients, in ``eval`` mode; its forward runs under ``no_grad`` on the policy's
    packed batch. Rows are split over the data-parallel ranks (the ranks of a context-parallel
    group share theirs); the loss is each rank's mean, which FSDP's gradient average turns
    into the global mean. Checkpointing, resume, logging and the lr schedule are the
    trainer's (the reference is not checkpointed: a resumed run rebuilds it from
    ``init_from``).

    Args:
        cfg: the :class:`DPOConfig`. dist_info: as for the trainer.
        vae, text_encoder: already loaded models for the video files of ``pairs.csv``
            (default: those the ``--data`` index names, loaded only when the cache lacks
            something; see :class:`PairVideoCache`).

    Raises:
        ConfigError: no ``init_from``; a pair whose clips differ in shape; see
            :func:`read_pairs` and :class:`PairVideoCache`.
        FileNotFoundError: see :func:`read_pairs`.
    """

    def __init__(self, cfg: DPOConfig, dist_info=None, *, vae=None, text_encoder=None) -> None:
        if not cfg.init_from:
            raise ConfigError("train-dpo needs --init-from RUN: the policy and the frozen reference start there")
        super().__init__(cfg, dist_info)
        self.rows = read_pairs(cfg.pairs, shard_keys(self.data.entries), cfg.loss)
        self.videos: PairVideoCache | None = None
        if any(r.has_video for r in self.rows):
            self.videos = PairVideoCache(self.run_dir / "pair_latents", self.data.index, device=self.dist.device,
                                         vae=vae, text_encoder=text_encoder)
            if self.dist.is_main:  # rank 0 encodes what the cache lacks, the others then read it
                self._load_videos()
            if dist.is_initialized():
                dist.barrier()
            if not self.dist.is_main:
                self._load_videos()
        for row in self.rows:
            if row.rejected is not None and self._shape(row.preferred) != self._shape(row.rejected):
                raise ConfigError(f"--pairs line {row.line}: the latents of {self._name(row.preferred)} and "
                                  f"{self._name(row.rejected)} differ in shape ({self._shape(row.preferred)} vs "
                                  f"{self._shape(row.rejected)}); a pair shares its noise, so both clips need one "
                                  "shape (the same frame count, fps and resolution bucket)")
        row_tokens = [self._ref_tokens(r.preferred) + (self._ref_tokens(r.rejected) if r.rejected is not None else 0)
                      for r in self.rows]
        self.sampler = _RowSampler(len(self.rows), cfg.pairs_per_step, cfg.seed, self.dims.dp_rank(self.dist.rank),
                                   self.dims.dp, row_tokens)  # the ranks of a cp group read the same rows
        self.reference = self.build_reference()
        self.last_margin: float | None = None

    def _load_videos(self) -> None:
        for row in self.rows:
            for ref in (row.preferred, row.rejected):
                if isinstance(ref, Path):
                    self.videos.video(ref)
            if row.has_video:
                self.videos.text(row.prompt)

    def _name(self, ref: int | Path) -> str:
        if isinstance(ref, Path):
            return str(ref)
        file, meta = self.data.entries[ref]
        return f"{file}:{meta['key']}"

    def _shape(self, ref: int | Path) -> tuple[int, ...]:
        return tuple(self.videos.video(ref)[0].shape) if isinstance(ref, Path) else tuple(self.data.latent_shape(ref))

    def _ref_tokens(self, ref: int | Path) -> int:
        return self._tokens(self._shape(ref))

    def _clip(self, ref: int | Path) -> tuple[torch.Tensor, dict]:
        """``(latent float32 [C, T, h, w], meta)`` of a shard clip or a video of the pairs file."""
        if isinstance(ref, Path):
            return self.videos.video(ref)
        c = self.data[ref]
        return c.latent, c.meta

    def row_text(self, row: PairRow) -> torch.Tensor:
        """``float32 [L, D]`` caption states of a row: its encoded ``prompt`` when it names a
        video, else the stored caption states of its preferred shard clip."""
        return self.videos.text(row.prompt) if row.has_video else self.data[row.preferred].text

    def build_reference(self) -> torch.nn.Module:
        """The frozen reference: a second model built and parallelized by the policy's own
        factory and ``parallelize`` (under FSDP2 ``fully_shard`` per block and at the root on
        the same mesh, so its parameters are DTensors sharded like the policy's; the same
        activation checkpointing, compile, fp8 and context-parallel hooks), given the
        policy's current weights (``set_model_state_dict``, shard to shard), then
        ``requires_grad_(False)`` and ``eval()``. Collective under a process group."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        from mugv.train.parallelize import build_model

        ref = build_model(self.model_factory, device=self.dist.device, on_meta=self.model_on_meta,
                          seed=self.cfg.seed, parallelize=self.model_parallelize)
        set_model_state_dict(ref, get_model_state_dict(self.model))
        ref.requires_grad_(False)
        return ref.eval()

    def _errors(self, model, lat, tgt, texts, ts, fps, grad: bool):
        """Per-sample flow MSE ``[n]`` (mean over every latent element) of one packed forward."""
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx, torch.autocast(self.dist.device.type, dtype=self.param_dtype, enabled=self.autocast):
            out = model.forward_packed(lat, ts, texts, fps=fps)
        if not grad and isinstance(model, FSDPModule):
            model.reshard()  # no backward follows: free the unsharded root parameters now
        C = self.dit_cfg.in_channels
        return torch.stack([(o[:C].float() - y).pow(2).mean() for o, y in zip(out, tgt)])

    def batch(self, rows: tuple[int, ...], step: int):
        """Packed inputs of the rows: pairs give (w, l) with one ``t``, noise and caption;
        KTO rows give one clip. Returns the lists of ``forward_packed`` and the row layout."""
        dev, cfg = self.dist.device, self.cfg
        lat, tgt, texts, ts, fps, layout = [], [], [], [], [], []
        for r in rows:
            row = self.rows[r]
            xw, mw = self._clip(row.preferred)
            text = self.row_text(row).to(dev)
            T = xw.shape[1]
            shift = shift_ratio(mw["height"], mw["width"], T) if cfg.timestep_shift else None
            d = clip_randomness(cfg.seed, step, r, tuple(xw.shape), shift=shift, i2v_ratio=0.0, caption_dropout=0.0)
            members = [xw] if row.rejected is None else [xw, self._clip(row.rejected)[0]]
            for x in members:  # one t, one noise, one caption for both clips of a pair
                lat.append(add_noise(x, d.noise, d.t).to(dev))
                tgt.append(velocity_target(x, d.noise).to(dev))
                texts.append(text)
                ts.append(d.t * 1000.0)
                fps.append(float(mw["fps"]))
            layout.append((row.rejected is not None, row.liked))
        return lat, tgt, texts, torch.tensor(ts, device=dev), torch.tensor(fps, device=dev), layout

    def preference_loss(self, rows: tuple[int, ...], step: int, grad: bool = True):
        """``(loss, stats)`` of the rows at ``step`` (stats: ``margin``, ``accuracy``,
        ``flow_w``, ``flow_l``, the policy's mean flow MSE on preferred / rejected clips)."""
        cfg = self.cfg
        lat, tgt, texts, ts, fps, layout = self.batch(rows, step)
        e = self._errors(self.model, lat, tgt, texts, ts, fps, grad)
        e_ref = self._errors(self.reference, lat, tgt, texts, ts, fps, False)
        if cfg.loss == "dpo":
            if not all(paired for paired, _ in layout):
                raise ConfigError("--loss dpo needs preferred,rejected pairs")
            ew, el, rw, rl = e[0::2], e[1::2], e_ref[0::2], e_ref[1::2]
            per, inside = dpo_loss(ew, el, rw, rl, cfg.beta)
            loss = per.mean() + cfg.sft_weight * ew.mean()
            stats = {"margin": inside.mean().item(), "accuracy": (inside > 0).float().mean().item(),
                     "flow_w": ew.mean().item(), "flow_l": el.mean().item()}
        else:
            liked = torch.tensor([v for paired, like in layout for v in ((True, False) if paired else (like,))],
                                 device=e.device)
            r0 = -0.5 * cfg.beta * (e.detach() - e_ref)
            tot = torch.stack([r0.sum(), torch.tensor(float(r0.numel()), device=r0.device)])
            if dist.is_initialized():
                dist.all_reduce(tot)  # the batch estimate of KTO's KL term is over the global step
            per, r = kto_loss(e, e_ref, liked, cfg.beta, z=(tot[0] / tot[1]).clamp_min(0.0))
            loss = per.mean() + cfg.sft_weight * (e[liked].mean() if liked.any() else e.sum() * 0)
            stats = {"margin": (r[liked].mean() - r[~liked].mean()).item() if liked.any() and (~liked).any()
                     else float("nan"), "flow_w": e[liked].mean().item() if liked.any() else float("nan"),
                     "flow_l": e[~liked].mean().item() if (~liked).any() else float("nan")}
        return loss, stats

    def train_step(self, indices: tuple[int, ...]) -> StepResult:
        """One optimizer step on this rank's rows (collective under FSDP); see the module docstring."""
        from mugv.train.schedule import set_lr

        cfg, step = self.cfg, self.step
        lr = set_lr(self.optimizer, step, cfg)
        loss, stats = self.preference_loss(indices, step)
        self.last_margin = stats["margin"]
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= self.dist.world_size
        mean_loss = mean.item()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm, ok = None, math.isfinite(mean_loss)
        if ok:
            loss.backward()
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
            grad_norm = (gn.full_tensor() if hasattr(gn, "full_tensor") else gn).item()
            ok = math.isfinite(grad_norm)
        res = StepResult(mean_loss if ok else None, lr, grad_norm, [self.sampler.tokens[i] for i in indices],
                         [0] * len(indices))
        self.step += 1
        if not ok:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            self.skipped += 1
            if self.bad_in_row >= cfg.max_bad_steps:
                raise NonFiniteLossError(f"{self.bad_in_row} consecutive non-finite DPO steps (last at step {step})")
            return res
        self.bad_in_row = 0
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step)
        return res


def train_dpo(cfg: DPOConfig, stop_after: int | None = None):
    """Build a :class:`DPOTrainer` for ``cfg`` and run it (``mugv train-dpo``)."""
    return DPOTrainer(cfg).fit(stop_after=stop_after)
