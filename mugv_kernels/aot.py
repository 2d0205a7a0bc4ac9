"""Ahead-of-time compile check: every Triton kernel specialization the ops launch at the
benchmark shapes compiles for Hopper (sm_90a), with no register spills.

The interpreter that runs our CPU tests is more permissive than Triton's compiler, so a
kernel that passes them can still fail to build on an H100. Each op family registers
*cases* with :func:`mugv_kernels._registry.register_aot_cases`: functions that call its launchers on ``meta``
tensors of the benchmark shapes. Run inside :func:`mugv_kernels._registry.capture_launches`,
they record exactly the launches the ops make (kernel, argument dtypes, constexprs,
``num_warps``, ``num_stages``) without allocating memory. Each distinct specialization is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and its
PTX assembled by ``ptxas -arch=sm_90a -v`` (the one shipped in the triton wheel), which
reports registers, spill bytes and shared memory. No GPU is needed.

Usage::

    python -m mugv_kernels.aot            # print the table; exit 1 on a failure or spill

Must run without ``TRITON_INTERPRET=1`` (the interpreter replaces compiled kernels).
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

_PTR_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float64: "*fp64",
    torch.int8: "*i8",
    torch.uint8: "*u8",
    torch.int16: "*i16",
    torch.int32: "*i32",
    torch.int64: "*i64",
    torch.bool: "*i1",
}


@dataclass(frozen=True)
class Specialization:
    """One compiled variant of a kernel: what ``triton.compile`` is given."""

    family: str
    kernel: Any = field(compare=False, hash=False)
    kernel_name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    def label(self) -> str:
        """Short description: pointer dtypes and the constexprs that are set."""
        dtypes = sorted({t[1:] for _, t in self.signature if t.startswith("*") and t[1:] not in ("i32", "i64")})
        flags = [k for k, v in self.constexprs if v is True]
        sizes = [f"{k}={v}" for k, v in self.constexprs if isinstance(v, int) and not isinstance(v, bool)]
        return ",".join(dtypes) + " " + " ".join(sizes + flags)


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return _PTR_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


def _specialization(family: str, rec) -> Specialization:
    kernel = rec.kernel
    kwargs = dict(rec.kwargs)
    num_warps = int(kwargs.pop("num_warps", 4))
    num_stages = int(kwargs.pop("num_stages", 3))
    names = list(kernel.arg_names)
    bound = dict(zip(names, rec.args))
    bound.update(kwargs)
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{kernel.__name__}: launch did not bind {missing}")
    signature, constexprs = [], []
    for param, name in zip(kernel.params, names):
        value = bound[name]
        if param.is_constexpr or value is None:
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
        else:
            signature.append((name, _arg_type(value)))
    return Specialization(
        family, kernel, kernel.__name__, tuple(signature), tuple(constexprs), num_warps, num_stages
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
    """Outcome of compiling one specialization for sm_90a."""

    spec: Specialization
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0


def _ptxas() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def compile_one(spec: Specialization, arch: int = 90) -> AotResult:
    """Compile ``spec`` with Triton for ``sm_{arch}`` and assemble its PTX with ``ptxas -v``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = AotResult(spec)
    try:
        src = ASTSource(fn=spec.kernel, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        result.shared_bytes = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
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


def format_table(results: list[AotResult]) -> str:
    """The table ``python -m mugv_kernels.aot`` prints."""
    rows = [("kernel", "specialization", "warps", "stages", "regs", "spill B", "smem B", "status")]
    for r in results:
        status = "ok" if r.ok else (r.error or f"SPILLS {r.spill_bytes} B")
        rows.append(
            (
                r.spec.kernel_name,
                r.spec.label(),
                str(r.spec.num_warps),
                str(r.spec.num_stages),
                str(r.registers if r.registers is not None else "-"),
                str(r.spill_bytes if r.spill_bytes is not None else "-"),
                str(r.shared_bytes if r.shared_bytes is not None else "-"),
                status,
            )
        )
    widths = [max(len(row[i]) for row in rows[:]) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mugv_kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", action="append", help="only these op families (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("mugv_kernels.aot: unset TRITON_INTERPRET (the interpreter replaces compiled kernels)", file=sys.stderr)
        return 2
    specs = collect_specializations(args.family)
    results = compile_all(specs, args.jobs)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)} of {len(results)} specializations compile for sm_90a with no spills")
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(main())
