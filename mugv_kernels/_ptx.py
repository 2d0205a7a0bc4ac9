"""Static analysis of the PTX Triton emits for Hopper: global memory access widths per
kernel argument, the tensor-core instructions matmuls lower to, and the occupancy that
registers and shared memory allow on an H100.

Everything here reads *static* instructions: a load inside a loop counts once, and the
byte figures are per thread (an instruction's access width), not traffic. They answer
"which instruction moves this tensor", the question that decides whether a memory-bound
kernel can approach HBM bandwidth (a 16-bit scalar load moves 1/8 of what a 128-bit one
does per issue slot) and whether a matmul runs on Hopper's asynchronous warpgroup tensor
cores (``wgmma.mma_async``) or on the Ampere-style ``mma.sync`` path.

Access widths (PTX ISA 8.x, "Data Movement and Conversion Instructions"): ``ld.global``
and ``st.global`` (including ``.nc``, cache-hinted and predicated forms) move
``vec x bits`` per thread, ``vec`` from ``.v2``/``.v4``/``.v8`` (1 without), ``bits`` from
the type suffix (``.b16``, ``.f32``, ``.b64`` ...); ``cp.async.{ca,cg}.shared.global``
moves its copy-size operand (4, 8 or 16 bytes); ``atom.global``/``red.global`` as ``ld``;
``cp.async.bulk.tensor`` (TMA) is counted per instruction (its box size is not in the
instruction).

Which argument an access belongs to: a forward data-flow pass over the PTX registers
(iterated to a fixed point, so loop-carried pointers are followed) marks every register
with the kernel pointer parameters it is computed from (``ld.param`` of that parameter,
then any arithmetic, ``mov``, ``selp`` ...). Values loaded from memory carry no mark, so a
gathered index does not make its table the owner of the gathered address. An access
whose address register carries exactly one pointer parameter is attributed to it; one
with none or several is reported under ``"?"``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "H100",
    "Access",
    "HopperLimits",
    "global_accesses",
    "mma_counts",
    "occupancy",
    "summarize_accesses",
]

_REG = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"\[\s*([A-Za-z_$][\w$]*_param_(\d+))\s*\]")
_BITS = {"8": 8, "16": 16, "32": 32, "64": 64, "128": 128}
# opcodes whose first operand is not written (stores, copies, control, barriers)
_NO_DEST = ("st.", "cp.", "red.", "bar.", "bra", "ret", "exit", "membar", "fence", "prefetch", "wgmma.fence",
            "wgmma.commit", "wgmma.wait")


@dataclass(frozen=True)
class Access:
    """One static global-memory instruction.

    Attributes:
        kind: ``"load"`` (``ld.global``, ``.nc`` included), ``"store"`` (``st.global``),
            ``"cp_async"`` (global -> shared ``cp.async``), ``"atomic"`` (``atom``/``red``)
            or ``"tma"`` (``cp.async.bulk.tensor``).
        bits: access width per thread in bits (``0`` for TMA: not in the instruction).
        tensor: the kernel argument the address is computed from, or ``"?"``.
        opcode: the PTX opcode, e.g. ``"ld.global.nc.v4.b32"``.
    """

    kind: str
    bits: int
    tensor: str
    opcode: str


def _instructions(ptx: str) -> list[str]:
    body = ptx.split("\t.section", 1)[0].split("\n.section", 1)[0]  # debug sections follow the code
    body = re.sub(r"//[^\n]*", "", body)
    body = re.sub(r"^\s*\.(loc|file)\b[^\n]*", "", body, flags=re.M)  # directives without ';'
    out = []
    for stmt in body.split(";"):
        stmt = " ".join(stmt.split())
        while stmt.startswith(("{", "}")):
            stmt = stmt[1:].lstrip()
        # labels ("$L__BB0_2:") precede an instruction in the same statement
        stmt = re.sub(r"^(\$?[\w$]+:\s*)+", "", stmt)
        if stmt and not stmt.startswith("."):
            out.append(stmt)
    return out


def _split(stmt: str) -> tuple[str, str]:
    """``(opcode, operands)`` with any ``@%p`` / ``@!%p`` predicate dropped."""
    if stmt.startswith("@"):
        stmt = stmt.split(" ", 1)[1] if " " in stmt else ""
    parts = stmt.split(" ", 1)
    return parts[0], (parts[1] if len(parts) > 1 else "")


def _width(opcode: str) -> int:
    parts = opcode.split(".")
    vec = 1
    bits = 0
    for p in parts:
        if p in ("v2", "v4", "v8"):
            vec = int(p[1])
        m = re.fullmatch(r"[bufs](8|16|32|64|128)(x2)?", p)
        if m:
            bits = _BITS[m.group(1)] * (2 if m.group(2) else 1)
    return vec * bits


def _first_operand(operands: str) -> str:
    depth = 0
    for i, ch in enumerate(operands):
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            return operands[:i]
    return operands


def _taint(instrs: list[tuple[str, str]], pointer_params: dict[int, str]) -> dict[str, frozenset[int]]:
    """Register -> pointer parameters it is computed from (fixed point over the program)."""
    marks: dict[str, frozenset[int]] = {}
    empty: frozenset[int] = frozenset()
    changed = True
    while changed:
        changed = False
        for opcode, operands in instrs:
            if not operands or opcode.startswith(_NO_DEST):
                continue
            first = _first_operand(operands)
            dests = _REG.findall(first)
            if not dests:
                continue
            if opcode.startswith("ld.param"):
                m = _PARAM.search(operands)
                src = frozenset([int(m.group(2))]) & frozenset(pointer_params) if m else empty
            elif opcode.startswith(("ld.", "atom.", "wgmma.", "mma.", "ldmatrix", "shfl", "tcgen")):
                src = empty  # loaded or computed data, not an address
            else:
                src = empty
                for reg in _REG.findall(operands[len(first):]):
                    src = src | marks.get(reg, empty)
            for d in dests:
                new = marks.get(d, empty) | src
                if new != marks.get(d, empty):
                    marks[d] = new
                    changed = True
    return marks


def _owner(address: str, marks: dict[str, frozenset[int]], pointer_params: dict[int, str]) -> str:
    owners: frozenset[int] = frozenset()
    for reg in _REG.findall(address):
        owners = owners | marks.get(reg, frozenset())
    if len(owners) == 1:
        return pointer_params[next(iter(owners))]
    return "?"


def _brackets(operands: str) -> list[str]:
    return re.findall(r"\[([^\]]*)\]", operands)


def global_accesses(ptx: str, pointer_params: dict[int, str]) -> list[Access]:
    """Every static global-memory instruction of ``ptx``, attributed to a kernel argument.

    Args:
        ptx: the PTX text of one kernel (``compiled.asm["ptx"]``).
        pointer_params: PTX parameter index -> argument name, for the pointer arguments
            (parameter ``i`` is the ``i``-th non-constexpr argument of the kernel).

    Returns:
        One :class:`Access` per instruction, in program order.
    """
    instrs = [_split(s) for s in _instructions(ptx)]
    marks = _taint(instrs, pointer_params)
    out = []
    for opcode, operands in instrs:
        addrs = _brackets(operands)

        def owner(i: int) -> str:
            return _owner(addrs[i] if len(addrs) > i else "", marks, pointer_params)

        if opcode.startswith("cp.async.bulk.tensor"):
            out.append(Access("tma", 0, owner(1), opcode))
        elif opcode.startswith("cp.async.") and ".global" in opcode and "bulk" not in opcode:
            size = re.search(r"(0x[0-9a-fA-F]+|\d+)", operands.split("]")[-1])
            out.append(Access("cp_async", 8 * int(size.group(1), 0) if size else 0, owner(1), opcode))
        elif opcode.startswith("ld.global"):
            out.append(Access("load", _width(opcode), owner(0), opcode))
        elif opcode.startswith("st.global"):
            out.append(Access("store", _width(opcode), owner(0), opcode))
        elif opcode.startswith(("atom.global", "red.global")):
            out.append(Access("atomic", _width(opcode), owner(0), opcode))
    return out


def summarize_accesses(accesses: Sequence[Access]) -> dict:
    """Static bytes per thread by kind and width, overall and per argument.

    Returns:
        ``{"total": {kind: {bits: bytes}}, "by_tensor": {name: {kind: {bits: bytes}}},
        "tma_instructions": int}``; ``bits`` keys are strings (``"16"``, ``"128"`` ...),
        ``bytes`` the sum of ``bits / 8`` over the static instructions.
    """
    total: dict[str, dict[str, int]] = {}
    by_tensor: dict[str, dict[str, dict[str, int]]] = {}
    tma = 0
    for a in accesses:
        if a.kind == "tma":
            tma += 1
            continue
        for table in (total, by_tensor.setdefault(a.tensor, {})):
            bucket = table.setdefault(a.kind, {})
            bucket[str(a.bits)] = bucket.get(str(a.bits), 0) + a.bits // 8
    return {"total": total, "by_tensor": by_tensor, "tma_instructions": tma}


def mma_counts(ptx: str) -> dict[str, int]:
    """Static tensor-core instructions: ``{"wgmma": n, "mma_sync": n}``.

    ``wgmma`` counts ``wgmma.mma_async`` (Hopper warpgroup MMA, operands from shared
    memory descriptors); ``mma_sync`` counts ``mma.sync`` (the warp-level path of sm_80).
    """
    ops = [_split(s)[0] for s in _instructions(ptx)]
    return {
        "wgmma": sum(op.startswith("wgmma.mma_async") for op in ops),
        "mma_sync": sum(op.startswith("mma.sync") for op in ops),
    }


@dataclass(frozen=True)
class HopperLimits:
    """Per-SM resources of an sm_90 GPU (CUDA C Programming Guide, "Compute Capability
    9.0" table; H100 SXM5).

    Attributes:
        registers: 32-bit registers per SM (65536).
        max_warps: resident warps per SM (64, i.e. 2048 threads).
        max_blocks: resident thread blocks per SM (32).
        shared_bytes: shared memory per SM with the largest carveout (228 KiB).
        max_shared_per_block: largest dynamic shared memory of one block (227 KiB).
        reserved_shared_per_block: shared memory the driver reserves per block (1 KiB).
        register_granularity: registers are allocated per warp in units of 256.
        max_registers_per_thread: 255.
    """

    registers: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 228 * 1024
    max_shared_per_block: int = 227 * 1024
    reserved_shared_per_block: int = 1024
    register_granularity: int = 256
    max_registers_per_thread: int = 255


H100 = HopperLimits()
"""The limits :func:`occupancy` uses by default."""


def occupancy(registers: int, shared_bytes: int, num_warps: int, limits: HopperLimits = H100) -> dict:
    """Resident warps per SM that registers, shared memory and the warp limit allow.

    The CUDA occupancy calculator's rule: a warp allocates
    ``ceil(registers * 32 / 256) * 256`` registers, so ``floor(65536 / that)`` warps fit by
    registers, and ``floor(those / num_warps)`` blocks; a block takes ``shared + 1 KiB``
    of the SM's 228 KiB; at most ``floor(64 / num_warps)`` blocks by warps and 32 by
    count. Blocks per SM is the minimum of the four; warps per SM = blocks x num_warps.

    Args:
        registers: registers per thread (``ptxas -v``).
        shared_bytes: shared memory per block in bytes (Triton's dynamic allocation).
        num_warps: warps per block.
        limits: the SM's resources.

    Returns:
        ``{"blocks_per_sm", "warps_per_sm", "limiter"}``; ``limiter`` names the binding
        limit (``"warps"``, ``"blocks"``, ``"registers"``, ``"shared"``; the first of these
        on a tie), and a block that cannot be resident at all gives 0 blocks.

    Raises:
        ValueError: a negative count or ``num_warps < 1``.
    """
    if registers < 0 or shared_bytes < 0 or num_warps < 1:
        raise ValueError(f"occupancy: need registers, shared_bytes >= 0 and num_warps >= 1, got "
                         f"{registers}, {shared_bytes}, {num_warps}")
    g = limits.register_granularity
    per_warp = -(-max(registers, 1) * 32 // g) * g
    by = {  # in this order for ties: a hardware cap binds before a resource
        "warps": limits.max_warps // num_warps,
        "blocks": limits.max_blocks,
        "registers": (limits.registers // per_warp) // num_warps
        if registers <= limits.max_registers_per_thread else 0,
        "shared": limits.shared_bytes // (shared_bytes + limits.reserved_shared_per_block)
        if shared_bytes <= limits.max_shared_per_block else 0,
    }
    limiter = min(by, key=lambda k: (by[k], list(by).index(k)))
    blocks = by[limiter]
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps, "limiter": limiter}
