"""The package stack is one-way: every import of every module (module-level and inside
functions, read with ``ast``, nothing imported) goes to a lower layer or stays inside its
own sub-package, so no two sub-packages import each other, and ``mugv_kernels`` never
imports ``mugv``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: Lowest first. A unit may import units of lower layers only (and itself). ``mugv`` is the
#: package ``__init__``; ``mugv.config`` needs only the standard library, ``mugv.profiling`` only
#: torch and mugv_kernels; ``mugv.perf`` models
#: the DiT's cost; the generation pipeline reads the run checkpoints that training writes, so
#: it sits above ``mugv.train``, and the run sampler on it. The enhancer (``mugv.enhance``) sits
#: under the pipeline, which re-exports it.
LAYERS: list[tuple[str, ...]] = [
    ("mugv_kernels",),
    ("mugv", "mugv.config", "mugv.profiling"),
    ("mugv.models", "mugv.text"),
    ("mugv.diffusion", "mugv.perf"),
    ("mugv.data",),
    ("mugv.train",),
    ("mugv.enhance",),
    ("mugv.pipeline",),
    ("mugv.sample",),
    ("mugv.demo",),
    ("mugv.cli",),
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _modules() -> dict[str, Path]:
    """``module name -> file`` for every ``.py`` file of both packages."""
    out = {}
    for pkg in ("mugv_kernels", "mugv"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _unit(module: str) -> str:
    """``mugv_kernels.ops.x -> mugv_kernels``, ``mugv.train.x -> mugv.train``, ``mugv -> mugv``."""
    parts = module.split(".")
    return parts[0] if parts[0] == "mugv_kernels" else ".".join(parts[:2])


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every ``mugv``/``mugv_kernels`` module ``name`` imports, wherever the statement is."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    return {m for m in found if m.split(".")[0] in ("mugv", "mugv_kernels")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_every_unit_has_a_layer(graph):
    unknown = sorted({_unit(m) for m in graph} - set(RANK))
    assert not unknown, f"add {unknown} to LAYERS in {Path(__file__).name}"


def test_imports_go_down_the_stack(graph):
    upward = sorted(
        f"{src} imports {dst}"
        for src, targets in graph.items()
        for dst in targets
        if _unit(src) != _unit(dst) and RANK.get(_unit(dst), len(RANK)) >= RANK.get(_unit(src), -1)
    )
    assert not upward, "imports against the stack " + " <- ".join("/".join(u) for u in LAYERS) + ":\n" + "\n".join(upward)


def test_no_circle_between_subpackages(graph):
    edges: dict[str, set[str]] = {}
    for src, targets in graph.items():
        edges.setdefault(_unit(src), set()).update(_unit(d) for d in targets if _unit(d) != _unit(src))
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(u: str, path: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                return path + [u, v]
            if v not in state and (cycle := visit(v, path + [u])):
                return cycle
        state[u] = 2
        return None

    for u in sorted(edges):
        if u not in state:
            cycle = visit(u, [])
            assert cycle is None, "import circle: " + " -> ".join(cycle[cycle.index(cycle[-1]):])


def test_kernels_never_import_mugv(graph):
    bad = sorted(f"{s} imports {d}" for s, ds in graph.items() if _unit(s) == "mugv_kernels"
                 for d in ds if d.split(".")[0] == "mugv")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports(tmp_path):
    """The parser finds absolute, relative and function-local imports (so the tests above can fail)."""
    f = tmp_path / "m.py"
    f.write_text("import mugv.config\nfrom . import shards\ndef g():\n    from mugv.train.trainer import train\n")
    modules = {"mugv.data.shards": f, "mugv.train.trainer": f}
    assert _imports("mugv.data.m", f, modules) == {"mugv.config", "mugv.data.shards", "mugv.train.trainer"}
    assert _unit("mugv.train.trainer") == "mugv.train" and RANK["mugv.train"] > RANK["mugv.data"]
