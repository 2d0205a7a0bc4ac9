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
* :class:`LiveTensorBytes`: counts the bytes of the tensors that ops allocate and that are
  still alive, and their peak, on any device including CPU and ``meta`` (shapes only): a
  counted working set where no device allocator reports one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mugv_kernels._nvtx import annotate
from mugv_kernels._nvtx import range as nvtx_range

__all__ = ["LiveTensorBytes", "TorchProfile", "annotate", "nvtx_range", "parse_profile_steps"]


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


class LiveTensorBytes:
    """Count the storage bytes allocated by the ATen ops run inside the context, live and peak.

    A ``TorchDispatchMode`` sees every op's outputs; each new storage is added to the live count
    (a view or an in-place result shares its input's storage and adds nothing) and subtracted
    when the storage is freed (a ``weakref.finalize`` on it). :attr:`peak` is the most bytes
    alive at once. Tensors that existed before entering (inputs, weights) are not counted. On
    the ``meta`` device nothing is computed, so the working set of a 720p decode at the real
    widths counts in a fraction of a second. What it counts is what the ops allocate as PyTorch
    runs them on that device: a fused kernel elsewhere (e.g. flash attention, which never
    materializes the attention matrix) allocates less, and an allocator's caching and
    fragmentation come on top, so the result is a counted working set, not a measured peak.

    Attributes:
        live: bytes alive now. peak: the most bytes alive at once since entering.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._mode = None

    def _add(self, t: torch.Tensor) -> None:
        import weakref

        st = t.untyped_storage()
        key = st._cdata
        if key in self._sizes:
            return
        n = st.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __enter__(self) -> LiveTensorBytes:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                seen = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                        if isinstance(t, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in seen:
                        counter._add(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        mode, self._mode = self._mode, None
        mode.__exit__(*exc)
        return False
