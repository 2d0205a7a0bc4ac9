"""Test-only tools: count the bytes each Triton kernel loads and stores under the interpreter.

:func:`count_traffic` patches Triton's interpreter (``triton.runtime.interpreter``) for the
duration of a ``with`` block: every ``tl.load`` / ``tl.store`` (plain, masked or through a
block pointer) records the addresses of its unmasked lanes, and every kernel launch gets a
:class:`Launch` with the traffic per kernel argument. Masked-off lanes issue no memory
request on a GPU and are not counted.

Two figures per argument:

* ``loaded`` / ``stored``: bytes of every unmasked lane of every access (what the
  program asks for);
* ``unique_loaded`` / ``unique_stored``: bytes at distinct addresses in the launch. This
  is the launch's HBM traffic if every re-read of an address within a launch hits a cache
  (a row's second read of a RoPE partner, a modulation vector every program reads): the
  lower bound a launch can reach, to compare with the roofline's minimum bytes of the op
  (:mod:`mugv.perf`). A second launch over the same tensor, or a kernel that reads an
  fp32 copy, shows up in it.

Only under ``TRITON_INTERPRET=1``; nothing here runs on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ArgTraffic", "Launch", "count_traffic"]


@dataclass
class ArgTraffic:
    """Traffic of one kernel argument in one launch (bytes)."""

    name: str
    nbytes: int
    loaded: int = 0
    stored: int = 0
    unique_loaded: int = 0
    unique_stored: int = 0


@dataclass
class Launch:
    """One interpreted kernel launch: the kernel's name, its grid and per-argument traffic.

    ``other`` collects accesses to addresses outside every tensor argument (none expected).
    """

    kernel: str
    grid: tuple[int, ...]
    args: dict[str, ArgTraffic] = field(default_factory=dict)
    other: ArgTraffic = field(default_factory=lambda: ArgTraffic("<other>", 0))

    @property
    def loaded(self) -> int:
        return sum(a.loaded for a in self.args.values()) + self.other.loaded

    @property
    def stored(self) -> int:
        return sum(a.stored for a in self.args.values()) + self.other.stored

    @property
    def unique_loaded(self) -> int:
        return sum(a.unique_loaded for a in self.args.values()) + self.other.unique_loaded

    @property
    def unique_stored(self) -> int:
        return sum(a.unique_stored for a in self.args.values()) + self.other.unique_stored

    @property
    def unique_bytes(self) -> int:
        return self.unique_loaded + self.unique_stored


class _Recorder:
    """Accumulates (address, width) arrays per launch and resolves them to arguments."""

    def __init__(self):
        self.launches: list[Launch] = []
        self._ranges: list[tuple[int, int, str]] = []  # (start, end, argument name)
        self._loads: list[tuple[np.ndarray, int]] = []
        self._stores: list[tuple[np.ndarray, int]] = []
        self._current: Launch | None = None

    def begin(self, kernel: str, arg_names, args_hst) -> None:
        self._ranges, self._loads, self._stores = [], [], []
        launch = Launch(kernel, ())
        for name, a in zip(arg_names, args_hst):
            if hasattr(a, "data_ptr") and hasattr(a, "untyped_storage"):
                start = a.data_ptr()
                nbytes = _span_bytes(a)
                self._ranges.append((start, start + nbytes, name))
                launch.args[name] = ArgTraffic(name, nbytes)
        self._current = launch

    def access(self, kind: str, ptrs: np.ndarray, mask: np.ndarray, width: int) -> None:
        if self._current is None:
            return
        addr = np.asarray(ptrs, dtype=np.uint64)[np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs))]
        (self._loads if kind == "load" else self._stores).append((addr.ravel(), width))

    def end(self, grid) -> None:
        launch, self._current = self._current, None
        if launch is None:
            return
        launch.grid = tuple(grid)
        for kind, accesses in (("load", self._loads), ("store", self._stores)):
            by_width: dict[int, list[np.ndarray]] = {}
            for addr, width in accesses:
                by_width.setdefault(width, []).append(addr)
            for width, parts in by_width.items():
                addr = np.concatenate(parts)
                uniq = np.unique(addr)
                for target, sel_all, sel_uniq in self._split(launch, addr, uniq):
                    n_all = int(sel_all) * width
                    n_uniq = int(sel_uniq) * width
                    if kind == "load":
                        target.loaded += n_all
                        target.unique_loaded += n_uniq
                    else:
                        target.stored += n_all
                        target.unique_stored += n_uniq
        self.launches.append(launch)

    def _split(self, launch: Launch, addr: np.ndarray, uniq: np.ndarray):
        """(argument, count of all accesses, count of distinct addresses) per argument."""
        claimed_all = np.zeros(addr.shape, dtype=bool)
        claimed_uniq = np.zeros(uniq.shape, dtype=bool)
        for start, end, name in self._ranges:
            in_all = (addr >= start) & (addr < end) & ~claimed_all
            in_uniq = (uniq >= start) & (uniq < end) & ~claimed_uniq
            claimed_all |= in_all
            claimed_uniq |= in_uniq
            yield launch.args[name], in_all.sum(), in_uniq.sum()
        yield launch.other, (~claimed_all).sum(), (~claimed_uniq).sum()


def _span_bytes(t) -> int:
    """Bytes from a tensor's first element to one past its last (any strides)."""
    if t.numel() == 0:
        return 0
    last = sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return (last + 1) * t.element_size()


@contextlib.contextmanager
def count_traffic() -> Iterator[list[Launch]]:
    """Record every interpreted Triton launch in the block; yields the list of :class:`Launch`.

    Raises:
        RuntimeError: Triton's interpreter is not active (``TRITON_INTERPRET`` unset).
    """
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("count_traffic needs Triton's interpreter (TRITON_INTERPRET=1)")
    from triton.runtime import interpreter as interp

    rec = _Recorder()
    builder = interp.interpreter_builder
    cls = interp.InterpreterBuilder
    orig_load, orig_store = cls.create_masked_load, cls.create_masked_store
    orig_call, orig_init = interp.GridExecutor.__call__, interp.GridExecutor._init_args_hst

    def masked_load(self, ptrs, mask, other, *rest):
        width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        rec.access("load", ptrs.data, mask.data, width)
        return orig_load(self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        rec.access("store", ptrs.data, mask.data, width)
        return orig_store(self, ptrs, value, mask, *rest)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        names = list(self.arg_names)
        values = list(args_hst) + [kwargs_hst[n] for n in names[len(args_hst) :] if n in kwargs_hst]
        rec.begin(self.fn.__name__, names, values)
        return args_hst, kwargs_hst

    def call(self, *args, **kwargs):
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            rec.end(builder.grid_dim)

    cls.create_masked_load, cls.create_masked_store = masked_load, masked_store
    interp.GridExecutor._init_args_hst, interp.GridExecutor.__call__ = init_args, call
    try:
        yield rec.launches
    finally:
        cls.create_masked_load, cls.create_masked_store = orig_load, orig_store
        interp.GridExecutor._init_args_hst, interp.GridExecutor.__call__ = orig_init, orig_call
