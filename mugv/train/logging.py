"""Training metrics: tqdm progress on rank 0, TensorBoard scalars, throughput and MFU.

MFU (model FLOPs utilization, PaLM, arXiv 2204.02311 App. B) = useful training FLOPs per
second / the device's dense bf16 peak, the peak looked up from the GPU's name by
:func:`mugv_kernels.device.device_peaks` (never hard-coded); on CPU, or a GPU missing
from the table, MFU is not reported.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mugv_kernels.device import device_peaks

__all__ = ["MetricsLogger", "dit_train_flops", "memory_gib", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics JSON-lines file, in the order written.

    A torn last line (a crash in the middle of a write: no trailing newline, or not valid
    JSON) is dropped; a bad line before the last one is an error.

    Raises:
        ValueError: a line other than the last is not valid JSON (names the file and line).
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    torn = lines[-1]  # after the last newline: empty unless the last write was torn
    out = []
    for i, line in enumerate(lines[:-1]):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 2 and not torn:
                break  # a torn record that still got a newline (never written by us, tolerated)
            raise ValueError(f"read_metrics: {path} line {i + 1} is not valid JSON") from None
    return out


def dit_train_flops(
    matmul_params: int, depth: int, hidden: int, clip_tokens: Sequence[int], text_tokens: Sequence[int]
) -> float:
    """FLOPs of one training step (forward + backward = 3x forward) of a packed DiT batch.

    ``6 * matmul_params * tokens`` for the linear layers (Kaplan et al. 2020, the "6N"
    rule), plus self-attention ``12 * depth * hidden * L_i^2`` per clip of ``L_i`` tokens
    (QK^T and PV, 2 FLOPs per MAC, x3 for the backward) and cross-attention
    ``12 * depth * hidden * L_i * S_i`` with its caption of ``S_i`` tokens.

    Args:
        matmul_params: parameters of the layers applied to every video token (blocks' linears).
        depth: number of blocks.
        hidden: model width.
        clip_tokens: tokens of each packed clip.
        text_tokens: caption tokens of each clip (same length as ``clip_tokens``).
    """
    n = sum(clip_tokens)
    attn = sum(12.0 * depth * hidden * (l * l + l * s) for l, s in zip(clip_tokens, text_tokens, strict=True))
    return 6.0 * matmul_params * n + attn


def memory_gib(device: torch.device) -> float:
    """Peak memory: CUDA max allocated on a GPU, else the process's max RSS, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Progress bar + TensorBoard + a JSON-lines file of every step's metrics (rank 0 only).

    Args:
        out: run directory; TensorBoard events go to ``out/tb``, metrics to ``out/<name>.jsonl``.
        total_steps: steps of the run (for the progress bar).
        start_step: first step (after a resume).
        enabled: False on ranks other than 0 (every method is then a no-op).
        tensorboard: write TensorBoard events.
        progress: show a tqdm bar.
        log_every: TensorBoard write interval in steps.
        name: metrics file stem and bar label.
        device: the training device (for memory and the MFU peak).
        world_size: ranks sharing the work (MFU divides by ``world_size * peak``).
        keep_through: on opening, keep only the records of steps ``<= keep_through`` (a resumed
            run's steps after its checkpoint are rewritten, so no step appears twice) and drop a
            torn last line; TensorBoard purges its events after that step. None keeps all.

    Every record is flushed to the OS when written (a killed process loses none of them);
    :meth:`sync` makes them durable (fsync), and the trainer calls it before each checkpoint.
    """

    def __init__(
        self,
        out: str | Path,
        total_steps: int,
        *,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
        progress: bool = True,
        log_every: int = 10,
        name: str = "train",
        device: torch.device = torch.device("cpu"),
        world_size: int = 1,
        keep_through: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.device = device
        self.world_size = world_size
        self.log_every = max(1, log_every)
        peaks = device_peaks(device) if device.type == "cuda" else None
        self.peak_flops = peaks.bf16_flops * world_size if peaks else None
        self.tb = None
        self.bar = None
        self.file = None
        if not enabled:
            return
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}.jsonl"
        if keep_through is not None and path.exists():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_through]
            tmp = path.with_suffix(".jsonl.tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self.file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # on use: importing TensorBoard costs seconds

            purge = None if keep_through is None else keep_through + 1
            self.tb = SummaryWriter(str(out / "tb"), purge_step=purge, flush_secs=1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc=name, dynamic_ncols=True, leave=True)
        self._t = time.perf_counter()

    def step(self, step: int, loss: float, *, lr: float, grad_norm: float | None = None, tokens: int = 0,
             flops: float | None = None, skipped: int = 0, **extra: float) -> dict:
        """Record one optimizer step (``tokens``/``flops`` over all ranks). Returns the metrics."""
        if not self.enabled:
            return {}
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        m = {"step": step, "loss": loss, "lr": lr, "step_time_s": dt, "memory_gib": memory_gib(self.device)}
        if grad_norm is not None:
            m["grad_norm"] = grad_norm
        if tokens:
            m["tokens_per_s"] = tokens / dt
        if flops and self.peak_flops:
            m["mfu"] = flops / dt / self.peak_flops
        if skipped:
            m["skipped_steps"] = skipped
        m.update(extra)
        self.file.write(json.dumps(m) + "\n")
        self.file.flush()
        if self.tb is not None and (step % self.log_every == 0 or step == 1):
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
            self.tb.flush()
        if self.bar is not None:
            post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
            if "tokens_per_s" in m:
                post["tok/s"] = f"{m['tokens_per_s']:.0f}"
            if "mfu" in m:
                post["mfu"] = f"{m['mfu']:.1%}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        return m

    def sync(self) -> None:
        """Make every record written so far durable: flush TensorBoard, fsync the JSONL file."""
        if self.tb is not None:
            self.tb.flush()
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
