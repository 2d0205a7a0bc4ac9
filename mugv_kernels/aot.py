"""Ahead-of-time compile check and static analysis: every Triton kernel specialization
the ops launch at the benchmark shapes, compiled for Hopper (sm_90a) exactly as Triton's
JIT would compile it, with its register, spill, shared-memory, access-width, tensor-core
and occupancy figures. No GPU is needed; nothing here is a measurement.

The interpreter that runs our CPU tests is more permissive than Triton's compiler, so a
kernel that passes them can still fail to build on an H100, and say nothing about the
code it gets. Each op family registers *cases* with
:func:`mugv_kernels._registry.register_aot_cases`: functions that call its launchers on
``meta`` tensors of the benchmark shapes. Run inside
:func:`mugv_kernels._registry.capture_launches`, they record exactly the launches the ops
make (kernel, arguments, ``num_warps``, ``num_stages``) without allocating memory.

Specialization: :func:`jit_specialization` runs Triton's own launch-time binder on each
recorded launch (``tt.divisibility = 16`` on 16-byte-aligned pointers and on integers
divisible by 16, integers equal to 1 turned into constants, unless ``do_not_specialize``).
A ``meta`` tensor has no address: its storage is modelled at a 256-byte-aligned address
(every CUDA allocation is), so a view is 16-byte aligned iff ``storage_offset *
element_size`` is a multiple of 16. Each distinct specialization is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``, its PTX assembled
by ``ptxas -arch=sm_90a -v`` (the one in the triton wheel: registers, spill bytes) and
read by :mod:`mugv_kernels._ptx` (access widths per argument, ``wgmma`` vs ``mma.sync``,
occupancy on an H100 from the sm_90 register file and shared memory limits).

Usage::

    python -m mugv_kernels.aot                  # table; exit 1 on a failure or spill
    python -m mugv_kernels.aot --report         # + mma path, 128-bit shares, widths, warps/SM
    python -m mugv_kernels.aot --summary        # one Markdown row per kernel (the README's)
    python -m mugv_kernels.aot --json aot.json  # the full analysis, for other tools

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces compiled kernels).

JSON schema (``--json``; ``"schema": 1``)::

    {
      "schema": 1, "target": "sm_90a", "triton": "<version>",
      "limits": {<mugv_kernels._ptx.HopperLimits fields>},
      "kernels": [                        # one record per distinct specialization
        {
          "id": "<kernel>-<hash>",        # stable for equal specializations
          "family": "rope", "kernel": "_rope3d_fwd_kernel", "label": "<short text>",
          "variant": "D=72 interleaved" | "channels_last" | "all" | ...,  # Specialization.variant
          "num_warps": 4, "num_stages": 1,
          "signature": {"<arg>": "*bf16" | "i32" | "fp32" | "constexpr" | ...},
          "constexprs": {"<arg>": value},  # constexprs and arguments specialized to 1
          "divisible_by_16": ["<arg>", ...],
          "specialized_to_1": ["<arg>", ...],
          "scalars": {"<arg>": value},     # int/float arguments at the first launch
          "registers": int, "spill_bytes": int, "shared_bytes": int,   # per thread/block
          "occupancy": {"blocks_per_sm": int, "warps_per_sm": int,
                        "limiter": "warps" | "blocks" | "registers" | "shared"},
          "mma": {"wgmma": int, "mma_sync": int},                     # static counts
          "global": {"<kind>": {"<bits>": bytes}},  # kind: load|store|cp_async|atomic
          "by_tensor": {"<arg>" | "?": {"<kind>": {"<bits>": bytes}}},
          "tma_instructions": int,
          "main_tensors": ["<arg>", ...],   # 16-bit float pointer arguments
          "main_share_128": float | null,   # of main-tensor bytes, all kinds
          "main_load_share_128": float | null,   # of main-tensor load + cp_async bytes
          "all_share_128": float | null,    # of every access
          "ok": bool, "error": str | null
        }
      ]
    }

``bytes`` are static: the sum over PTX instructions of their per-thread access width
(an instruction in a loop counts once), so shares compare instruction widths, not
traffic.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["AotResult", "Specialization", "collect_specializations", "compile_all"]

_BASE_ADDRESS = 1 << 20
"""Modelled address of every recorded tensor's storage: CUDA allocations are at least
256-byte aligned (the caching allocator's blocks are 512-byte aligned), so only a view's
``storage_offset`` can break 16-byte alignment."""


class _ModelledPointer:
    """What Triton's JIT sees of a tensor argument: its dtype and its address. ``meta``
    tensors have no storage (``data_ptr()`` is 0); the address is modelled as
    ``_BASE_ADDRESS + storage_offset * element_size``."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self._address = _BASE_ADDRESS + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._address


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: what ``triton.compile`` is given, exactly as
    Triton's JIT derives it from the launch's arguments (see :func:`jit_specialization`).

    Attributes:
        family: the op family that registered the case (``"rope"`` ...).
        kernel: the ``triton.JITFunction``.
        kernel_name: its ``__name__``.
        signature: ``(argument, type)`` per argument, ``"constexpr"`` for constexprs and
            for integers the JIT specialized to the constant 1 (and ``None`` arguments).
        constexprs: ``(argument path, value)`` of every constexpr argument.
        attrs: ``(argument path, attributes)``: ``(("tt.divisibility", 16),)`` on
            16-byte-aligned pointers and integers divisible by 16.
        num_warps, num_stages: launch options.
        options: every backend option, as ``triton.compile`` takes them.
        scalars: ``(argument, value)`` of the integer and float arguments at the first
            recorded launch with this specialization (for reports; not part of its
            identity).
    """

    family: str
    kernel: Any = field(compare=False, hash=False)
    kernel_name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[tuple[int, ...], Any], ...]
    attrs: tuple[tuple[tuple[int, ...], tuple[tuple[str, int], ...]], ...]
    num_warps: int
    num_stages: int
    options: tuple[tuple[str, Any], ...] = field(compare=False, hash=False, default=())
    scalars: tuple[tuple[str, Any], ...] = field(compare=False, hash=False, default=())

    def _names(self) -> list[str]:
        return [name for name, _ in self.signature]

    def constexpr_dict(self) -> dict[str, Any]:
        """Argument name -> constexpr value (top-level arguments)."""
        names = self._names()
        return {names[path[0]]: v for path, v in self.constexprs if len(path) == 1}

    def divisible_by_16(self) -> list[str]:
        """Names of the arguments carrying ``tt.divisibility = 16``."""
        names = self._names()
        return [names[path[0]] for path, attr in self.attrs if ("tt.divisibility", 16) in attr]

    def specialized_to_one(self) -> list[str]:
        """Names of the integer arguments the JIT turned into the constant 1."""
        params = self.kernel.params
        return [n for p, (n, _), in zip(params, self.signature) if not p.is_constexpr
                and self.constexpr_dict().get(n, None) == 1]

    def label(self) -> str:
        """Short description: pointer dtypes, the constexprs that are set, and the
        integer arguments specialized to 1."""
        sig = dict(self.signature)
        dtypes = sorted({t[1:] for t in sig.values() if t.startswith("*") and t[1:] not in ("i32", "i64")})
        params = {p.name: p for p in self.kernel.params}
        cex = self.constexpr_dict()
        flags = [k for k, v in cex.items() if v is True]
        sizes = [f"{k}={v}" for k, v in cex.items() if params[k].is_constexpr and isinstance(v, int)
                 and not isinstance(v, bool)]
        ones = self.specialized_to_one()
        return ",".join(dtypes) + " " + " ".join(sizes + flags + ([f"1:{','.join(ones)}"] if ones else []))

    def variant(self) -> str:
        """The group the report and the gates file this specialization under:
        ``"D=<head_dim>"`` for kernels with a head-dim argument ``D``, ``"channels_last"``
        or ``"ncdhw"`` for kernels with channel-stride arguments (``s<x>c``: channels
        innermost when one of them is the constant 1), ``"interleaved"`` or
        ``"half-split"`` for kernels with an ``INTERLEAVED`` constexpr (RoPE pair layouts),
        plus ``"across-heads"`` when its ``ACROSS_HEADS`` constexpr is set; else ``"all"``."""
        parts = []
        scalars = dict(self.scalars)
        if "D" in scalars:
            parts.append(f"D={scalars['D']}")
        channel_strides = [n for n, _ in self.signature if re.fullmatch(r"s[a-z]c", n)]
        if channel_strides:
            ones = set(self.specialized_to_one())
            parts.append("channels_last" if ones & set(channel_strides) else "ncdhw")
        cex = self.constexpr_dict()
        if "INTERLEAVED" in cex:
            parts.append("interleaved" if cex["INTERLEAVED"] else "half-split")
        if cex.get("ACROSS_HEADS"):
            parts.append("across-heads")
        return " ".join(parts) or "all"

    def key(self) -> str:
        """Stable identifier of the specialization (kernel name, signature, constexprs,
        attributes, launch options), used as the JSON record's ``"id"``."""
        import hashlib

        text = repr((self.kernel_name, self.signature, self.constexprs, self.attrs, self.num_warps, self.num_stages))
        return f"{self.kernel_name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def _backend(arch: int = 90):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def jit_specialization(kernel: Any, args: tuple, kwargs: dict, arch: int = 90):
    """What ``kernel[grid](*args, **kwargs)`` would compile, without a GPU.

    Runs Triton's own launch-time specialization: the argument binder
    ``triton.runtime.jit.create_function_from_signature`` (which calls the C++
    ``native_specialize_impl`` with the CUDA backend: ``*dtype`` pointers carrying ``"D"``
    when ``data_ptr() % 16 == 0``, integers ``"D"`` when divisible by 16, ``("constexpr",
    1)`` for integers equal to 1, no specialization for floats, bools and
    ``do_not_specialize`` arguments), then ``JITFunction._pack_args`` (signature,
    constexprs, ``tt.divisibility`` attributes, backend options), as ``JITFunction.run``
    does. Tensors stand in through :class:`_ModelledPointer`.

    Args:
        kernel: a ``triton.JITFunction``.
        args, kwargs: the launch's arguments (tensors may be ``meta``).
        arch: the CUDA compute capability (90).

    Returns:
        ``(signature, constexprs, attrs, options)`` as ``triton.compile`` takes them:
        ``signature`` a dict name -> type, ``constexprs`` and ``attrs`` dicts keyed by
        argument path, ``options`` the backend's options dataclass.
    """
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    backend = _backend(arch)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)

    def wrap(v: Any) -> Any:
        return _ModelledPointer(v) if isinstance(v, torch.Tensor) else v

    kwargs = {k: wrap(v) for k, v in kwargs.items()}
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*[wrap(a) for a in args], **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _specialization(family: str, rec) -> Specialization:
    kernel = rec.kernel
    signature, constexprs, attrs, options = jit_specialization(kernel, rec.args, rec.kwargs)
    bound = dict(zip(kernel.arg_names, rec.args), **rec.kwargs)
    scalars = tuple(
        (p.name, bound[p.name]) for p in kernel.params
        if not p.is_constexpr and isinstance(bound.get(p.name), (int, float)) and not isinstance(bound[p.name], bool)
    )
    return Specialization(
        family,
        kernel,
        kernel.__name__,
        tuple(signature.items()),
        tuple(sorted(constexprs.items())),
        tuple(sorted((k, tuple(tuple(a) for a in v)) for k, v in attrs.items())),
        int(options.num_warps),
        int(options.num_stages),
        tuple(sorted(options.__dict__.items())),
        scalars,
    )


def collect_specializations(families: list[str] | None = None) -> list[Specialization]:
    """Run the registered cases under ``capture_launches``; return distinct specializations."""
    import mugv_kernels  # noqa: F401  (importing registers every family's cases)
    from mugv_kernels._registry import AOT_CASES, capture_launches

    seen: dict[Specialization, None] = {}
    for family, cases in sorted(AOT_CASES.items()):
        if families and family not in families:
            continue
        with capture_launches() as records:
            cases()
        for rec in records:
            seen.setdefault(_specialization(family, rec), None)
    return list(seen)


@dataclass
class AotResult:
    """Outcome of compiling one specialization for sm_90a, and its static analysis.

    Attributes:
        spec: what was compiled.
        registers, spill_bytes: from ``ptxas -v`` (per thread; spill = stores + loads).
        shared_bytes: Triton's shared memory allocation per block (``metadata.shared``).
        accesses: global memory instructions (:func:`mugv_kernels._ptx.global_accesses`).
        mma: ``{"wgmma": n, "mma_sync": n}`` static instruction counts.
        error: the compile or assembly error, if any.
    """

    spec: Specialization
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    accesses: list = field(default_factory=list)
    mma: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0

    def occupancy(self) -> dict | None:
        """Resident warps per SM on an H100 (:func:`mugv_kernels._ptx.occupancy`)."""
        from mugv_kernels._ptx import occupancy

        if self.registers is None or self.shared_bytes is None:
            return None
        return occupancy(self.registers, self.shared_bytes, self.spec.num_warps)

    def main_tensors(self) -> list[str]:
        """The kernel's *main tensors*: its pointer arguments of a 16-bit float type
        (``*bf16``/``*fp16``: activations, their gradients, modulation and affine
        vectors), or every float pointer argument when it has none. fp32 statistics and
        partial-sum buffers and integer index tables are not main tensors."""
        sig = dict(self.spec.signature)
        half = [n for n, t in sig.items() if t in ("*bf16", "*fp16")]
        return half or [n for n, t in sig.items() if t.startswith("*fp")]

    def share_128(self, kinds: tuple[str, ...] = ("load", "store", "cp_async", "atomic"),
                  tensors: list[str] | None = None) -> float | None:
        """Fraction of the static global-access bytes of ``kinds`` on ``tensors``
        (default: :meth:`main_tensors`) that 128-bit instructions move; None when there
        are no such accesses."""
        names = set(self.main_tensors() if tensors is None else tensors)
        sel = [a for a in self.accesses if a.kind in kinds and a.tensor in names]
        total = sum(a.bits for a in sel)
        return (sum(a.bits for a in sel if a.bits == 128) / total) if total else None


def _ptxas() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def _pointer_params(spec: Specialization) -> dict[int, str]:
    """PTX parameter index -> argument name for the pointer arguments (Triton's PTX
    parameters are the non-constexpr arguments in order, then its scratch pointers)."""
    runtime = [(n, t) for n, t in spec.signature if t != "constexpr"]
    return {i: n for i, (n, t) in enumerate(runtime) if t.startswith("*")}


def compile_one(spec: Specialization, arch: int = 90) -> AotResult:
    """Compile ``spec`` with Triton for ``sm_{arch}``, assemble its PTX with
    ``ptxas -v`` and analyse the PTX (:mod:`mugv_kernels._ptx`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mugv_kernels._ptx import global_accesses, mma_counts

    result = AotResult(spec)
    try:
        src = ASTSource(
            fn=spec.kernel,
            signature=dict(spec.signature),
            constexprs=dict(spec.constexprs),
            attrs={k: [list(a) for a in v] for k, v in spec.attrs},
        )
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
        result.shared_bytes = int(compiled.metadata.shared)
        ptx_text = compiled.asm["ptx"]
        result.accesses = global_accesses(ptx_text, _pointer_params(spec))
        result.mma = mma_counts(ptx_text)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(ptx_text)
            proc = subprocess.run(
                [_ptxas(), f"-arch=sm_{arch}a", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                capture_output=True,
                text=True,
            )
        if proc.returncode != 0:
            result.error = f"ptxas failed: {proc.stderr.strip()[-500:]}"
            return result
        report = proc.stderr
        regs = re.search(r"Used (\d+) registers", report)
        stores = re.search(r"(\d+) bytes spill stores", report)
        loads = re.search(r"(\d+) bytes spill loads", report)
        result.registers = int(regs.group(1)) if regs else None
        result.spill_bytes = (int(stores.group(1)) if stores else 0) + (int(loads.group(1)) if loads else 0)
    except Exception as exc:  # a compile error is a result to report, not a crash
        result.error = f"{type(exc).__name__}: {str(exc).strip()[-500:]}"
    return result


def compile_all(specs: list[Specialization], jobs: int = 2) -> list[AotResult]:
    """Compile every specialization (``jobs`` at a time: ptxas runs in subprocesses)."""
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(compile_one, specs))


def _jsonable(v: Any) -> Any:
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def to_record(r: AotResult) -> dict:
    """The JSON record of one specialization (schema in the module docstring)."""
    from mugv_kernels._ptx import summarize_accesses

    spec = r.spec
    names = [n for n, _ in spec.signature]
    summary = summarize_accesses(r.accesses)
    return {
        "id": spec.key(),
        "family": spec.family,
        "kernel": spec.kernel_name,
        "label": spec.label(),
        "variant": spec.variant(),
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "signature": dict(spec.signature),
        "constexprs": {".".join([names[p[0]], *map(str, p[1:])]): _jsonable(v) for p, v in spec.constexprs},
        "divisible_by_16": spec.divisible_by_16(),
        "specialized_to_1": spec.specialized_to_one(),
        "scalars": dict(spec.scalars),
        "registers": r.registers,
        "spill_bytes": r.spill_bytes,
        "shared_bytes": r.shared_bytes,
        "occupancy": r.occupancy(),
        "mma": r.mma,
        "global": summary["total"],
        "by_tensor": summary["by_tensor"],
        "tma_instructions": summary["tma_instructions"],
        "main_tensors": r.main_tensors(),
        "main_share_128": r.share_128(),
        "main_load_share_128": r.share_128(("load", "cp_async")),
        "all_share_128": r.share_128(tensors=sorted({a.tensor for a in r.accesses})),
        "ok": r.ok,
        "error": r.error,
    }


def to_json(results: list[AotResult]) -> dict:
    """The document ``--json PATH`` writes (schema in the module docstring)."""
    import triton

    from mugv_kernels._ptx import H100

    return {
        "schema": 1,
        "target": "sm_90a",
        "triton": triton.__version__,
        "limits": dict(H100.__dict__),
        "kernels": [to_record(r) for r in results],
    }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _widths(r: AotResult) -> str:
    """Main-tensor bytes per access width, e.g. ``128:96 32:8``."""
    names = set(r.main_tensors())
    by: dict[int, int] = {}
    for a in r.accesses:
        if a.tensor in names and a.kind != "tma":
            by[a.bits] = by.get(a.bits, 0) + a.bits // 8
    return " ".join(f"{b}:{n}" for b, n in sorted(by.items(), reverse=True)) or "-"


def _mma(r: AotResult) -> str:
    if r.mma.get("wgmma"):
        return "wgmma"
    if r.mma.get("mma_sync"):
        return "mma.sync"
    return "-"


def format_table(results: list[AotResult], report: bool = False) -> str:
    """The table ``python -m mugv_kernels.aot`` prints (``report``: with the static
    access-width, tensor-core and occupancy columns)."""
    head = ["kernel", "specialization", "warps", "stages", "regs", "spill B", "smem B"]
    if report:
        head += ["mma", "main 128b", "all 128b", "main bytes by width", "warps/SM"]
    rows = [tuple(head + ["status"])]
    for r in results:
        status = "ok" if r.ok else (r.error or f"SPILLS {r.spill_bytes} B")
        row = [
            r.spec.kernel_name,
            r.spec.label(),
            str(r.spec.num_warps),
            str(r.spec.num_stages),
            str(r.registers if r.registers is not None else "-"),
            str(r.spill_bytes if r.spill_bytes is not None else "-"),
            str(r.shared_bytes if r.shared_bytes is not None else "-"),
        ]
        if report:
            occ = r.occupancy()
            row += [
                _mma(r),
                _pct(r.share_128()),
                _pct(r.share_128(tensors=sorted({a.tensor for a in r.accesses}))),
                _widths(r),
                f"{occ['warps_per_sm']} ({occ['limiter']})" if occ else "-",
            ]
        rows.append(tuple(row + [status]))
    widths = [max(len(row[i]) for row in rows[:]) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)


def _span(values: list, fmt=str) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    lo, hi = min(vals), max(vals)
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)}"


def format_summary(results: list[AotResult]) -> str:
    """One Markdown row per kernel and :meth:`Specialization.variant` over its
    specializations (ranges where they differ): the table the README embeds
    (``--summary``)."""
    by_kernel: dict[tuple[str, str], list[AotResult]] = {}
    for r in results:
        by_kernel.setdefault((r.spec.kernel_name, r.spec.variant()), []).append(r)
    lines = [
        "| kernel | variant | specializations | tensor cores | main-tensor bytes in 128-bit | all bytes in 128-bit "
        "| registers | spills | shared KiB | warps/SM (limiter) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (name, variant), rs in by_kernel.items():
        occ = [r.occupancy() for r in rs]
        limiters = sorted({o["limiter"] for o in occ if o})
        mma = sorted({_mma(r) for r in rs})
        lines.append(
            f"| `{name}` | {variant} | {len(rs)} | {', '.join(mma)} "
            f"| {_span([r.share_128() for r in rs], _pct)} "
            f"| {_span([r.share_128(tensors=sorted({a.tensor for a in r.accesses})) for r in rs], _pct)} "
            f"| {_span([r.registers for r in rs])} | {_span([r.spill_bytes for r in rs])} "
            f"| {_span([r.shared_bytes for r in rs], lambda b: f'{b / 1024:.1f}')} "
            f"| {_span([o['warps_per_sm'] for o in occ if o])} ({', '.join(limiters)}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugv_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", help="only these op families (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--report", action="store_true", help="add access widths, tensor-core path, occupancy")
    parser.add_argument("--summary", action="store_true", help="print one Markdown row per kernel instead")
    parser.add_argument("--json", metavar="PATH", help="write the full analysis as JSON (schema: module doc)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("mugv_kernels.aot: unset TRITON_INTERPRET (the interpreter replaces compiled kernels)", file=sys.stderr)
        return 2
    specs = collect_specializations(args.family)
    results = compile_all(specs, args.jobs)
    print(format_summary(results) if args.summary else format_table(results, report=args.report))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(to_json(results), f, indent=1)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)} of {len(results)} specializations compile for sm_90a with no spills")
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(main())
