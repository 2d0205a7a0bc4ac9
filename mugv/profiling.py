"""Timeline markers and ``torch.profiler`` captures for training and sampling.

* :func:`nvtx_range` / :func:`annotate`: NVTX ranges for Nsight Systems, the switch of
  :mod:`mugv_kernels` (off unless ``MUGV_NVTX=1`` at import; a shared no-op context
  manager, or the undecorated function, when off). The stack marks each DiT block
  (``dit.block.<i>``), attention (``dit.self_attn``, ``dit.cross_attn``) and MLP
  (``dit.mlp``), the VAE stages (``vae.encode``, ``vae.decode``, ``vae.encoder``,
  ``vae.decoder``), the training-step phases (``train.data``, ``train.forward``,
  ``train.backward``, ``train.optimizer``, ``train.checkpoint``) and each sampling step
  (``sample.step.<i>``).
* :class:`TorchProfile`: a ``torch.profiler`` capture over chosen steps (``mugv train
  --profile-steps 10:12``) or a whole run (``mugv generate --profile``) that writes a
  Chrome / Perfetto trace (``trace.json``, open in ``chrome://tracing`` or
  ui.perfetto.dev) and a table of the top kernels by self device time (self CPU time
  without a GPU), ``top_kernels.txt``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mugv_kernels._nvtx import annotate
from mugv_kernels._nvtx import range as nvtx_range

__all__ = ["TorchProfile", "annotate", "nvtx_range", "parse_profile_steps"]


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """``"A:B"`` -> ``(A, B)``: profile the optimizer steps ``A <= step < B`` (0-based, as
    the ``step`` of ``train.jsonl`` counts them before the update); ``""`` -> None.

    Raises:
        ValueError: not two integers ``0 <= A < B`` separated by ``:``.
    """
    if not spec:
        return None
    parts = spec.split(":")
    try:
        start, stop = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"profile_steps must be 'START:STOP' (two integers), got {spec!r}") from None
    if not 0 <= start < stop:
        raise ValueError(f"profile_steps needs 0 <= START < STOP, got {spec!r}")
    return start, stop


class TorchProfile:
    """A ``torch.profiler`` capture that writes ``trace.json`` and ``top_kernels.txt`` to ``out_dir``.

    Args:
        out_dir: directory for the two files (created on :meth:`stop`).
        rows: rows of the top-kernels table (default 25).

    Use as a context manager, or :meth:`start` / :meth:`stop` around the steps to capture.
    """

    def __init__(self, out_dir: str | Path, rows: int = 25):
        self.out_dir = Path(out_dir)
        self.rows = rows
        self._prof = None
        self.trace_path = self.out_dir / "trace.json"
        self.table_path = self.out_dir / "top_kernels.txt"

    @property
    def active(self) -> bool:
        return self._prof is not None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts, record_shapes=True)
        self._prof.__enter__()

    def stop(self) -> Path:
        """End the capture and write both files; returns the trace's path."""
        if self._prof is None:
            raise RuntimeError("TorchProfile.stop() without start()")
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.trace_path))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        self.table_path.write_text(prof.key_averages().table(sort_by=sort, row_limit=self.rows) + "\n")
        return self.trace_path

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        if self._prof is not None:
            self.stop()
        return False
