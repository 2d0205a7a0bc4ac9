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

``pairs.csv``: columns ``prompt,preferred,rejected`` with shard keys of the ``--data``
shards (the pair's latents need the same shape, since they share the noise; the preferred
clip's caption states condition both), or for KTO also ``key,label`` (label 1 = liked,
0 = disliked). ``prompt`` is recorded, not re-encoded.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

from mugv.config import ConfigError, DPOConfig
from mugv.diffusion import add_noise, shift_ratio, velocity_target
from mugv.train.trainer import NonFiniteLossError, StepResult, Trainer, clip_randomness

__all__ = ["DPOTrainer", "dpo_loss", "kto_loss", "read_pairs", "train_dpo"]


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


def read_pairs(path: str | Path, keys: dict[str, int], loss: str) -> list[tuple[int, int | None, bool]]:
    """Rows of ``pairs.csv`` as ``(preferred_index, rejected_index, liked)``: pairs have a
    rejected index (``liked`` True); KTO ``key,label`` rows have None and their label.

    Raises:
        FileNotFoundError: no file. ConfigError: missing columns, an unknown shard key, a bad
            label, a pairs file with no rows, ``key,label`` rows for ``dpo``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--pairs {path}: not found")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"--pairs {path}: no rows")
    cols = set(rows[0])

    def idx(k: str, line: int) -> int:
        if k not in keys:
            raise ConfigError(f"--pairs {path} line {line}: shard key {k!r} not in the data")
        return keys[k]

    out = []
    if {"preferred", "rejected"} <= cols:
        for n, r in enumerate(rows, 2):
            out.append((idx(r["preferred"], n), idx(r["rejected"], n), True))
    elif {"key", "label"} <= cols and loss == "kto":
        for n, r in enumerate(rows, 2):
            if r["label"] not in ("0", "1"):
                raise ConfigError(f"--pairs {path} line {n}: label must be 1 (liked) or 0 (disliked), got {r['label']!r}")
            out.append((idx(r["key"], n), None, r["label"] == "1"))
    else:
        raise ConfigError(f"--pairs {path}: expected columns prompt,preferred,rejected"
                          + (" or key,label" if loss == "kto" else f", got {sorted(cols)}"))
    return out


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

    Raises:
        ConfigError: no ``init_from``; a pair whose clips differ in shape; see
            :func:`read_pairs`.
    """

    def __init__(self, cfg: DPOConfig, dist_info=None) -> None:
        if not cfg.init_from:
            raise ConfigError("train-dpo needs --init-from RUN: the policy and the frozen reference start there")
        super().__init__(cfg, dist_info)
        keys: dict[str, int] = {}
        for i, (_, meta) in enumerate(self.data.entries):
            keys.setdefault(meta["key"], i)
        self.rows = read_pairs(cfg.pairs, keys, cfg.loss)
        for w, l, _ in self.rows:
            if l is not None and self.data.latent_shape(w) != self.data.latent_shape(l):
                raise ConfigError(f"pair ({self.data.entries[w][1]['key']}, {self.data.entries[l][1]['key']}): the "
                                  f"latents differ in shape ({self.data.latent_shape(w)} vs {self.data.latent_shape(l)}); "
                                  "a pair shares its noise, so both clips need one shape")
        row_tokens = [self.clip_tokens[w] + (self.clip_tokens[l] if l is not None else 0) for w, l, _ in self.rows]
        self.sampler = _RowSampler(len(self.rows), cfg.pairs_per_step, cfg.seed, self.dims.dp_rank(self.dist.rank),
                                   self.dims.dp, row_tokens)  # the ranks of a cp group read the same rows
        self.reference = self.build_reference()
        self.last_margin: float | None = None

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
            w, l, liked = self.rows[r]
            cw = self.data[w]
            T = cw.latent.shape[1]
            shift = shift_ratio(cw.meta["height"], cw.meta["width"], T) if cfg.timestep_shift else None
            d = clip_randomness(cfg.seed, step, r, tuple(cw.latent.shape), shift=shift, i2v_ratio=0.0,
                                caption_dropout=0.0)
            members = [cw] if l is None else [cw, self.data[l]]
            for c in members:
                lat.append(add_noise(c.latent, d.noise, d.t).to(dev))
                tgt.append(velocity_target(c.latent, d.noise).to(dev))
                texts.append(cw.text.to(dev))
                ts.append(d.t * 1000.0)
                fps.append(float(cw.meta["fps"]))
            layout.append((l is not None, liked))
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
