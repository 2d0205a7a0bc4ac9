"""NVTX ranges: off by default with no wrapper at all, on with MUGV_NVTX=1 (checked in
subprocesses, since the switch is read at import)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = textwrap.dedent(
    """
    import json, torch
    import mugv_kernels as mk
    from mugv_kernels import _nvtx
    from mugv_kernels.ops.ada_norm import ada_layer_norm as raw

    pushed = []
    torch.cuda.nvtx.range_push = lambda name: pushed.append(name)
    torch.cuda.nvtx.range_pop = lambda: pushed.append("pop")
    if _nvtx.BACKEND == "nvtx":
        import nvtx
        class _Fake:
            def __init__(self, name, **kw): self.name = name
            def __enter__(self): pushed.append(self.name)
            def __exit__(self, *a): pushed.append("pop")
        nvtx.annotate = _Fake
    x = torch.randn(1, 3, 8)
    y = mk.ada_layer_norm(x, None, None)
    with _nvtx.range("outer"):
        pass
    f = lambda: 1
    enabled, backend = _nvtx.ENABLED, _nvtx.BACKEND
    null_shared = _nvtx.range("a") is _nvtx.range("b")
    import importlib, sys
    sys.modules["nvtx"] = None  # without the nvtx package: torch.cuda.nvtx
    fallback = importlib.reload(_nvtx)
    with fallback.range("fallback"):
        pass
    print(json.dumps({"fallback_backend": fallback.BACKEND,"enabled": enabled, "backend": backend, "pushed": pushed,
                      "same_function": mk.ada_layer_norm is raw, "decorated_is_fn": _nvtx.annotate("r")(f) is f,
                      "null_shared": null_shared}))
    """
)


def _probe(env_value: str | None) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != "MUGV_NVTX"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)  # the reference path: quick
    if env_value is not None:
        env["MUGV_NVTX"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_off_by_default_and_zero_cost():
    r = _probe(None)
    assert r["enabled"] is False and r["backend"] is None and r["pushed"] == []
    assert r["same_function"] and r["decorated_is_fn"] and r["null_shared"]
    assert r["fallback_backend"] is None


def test_on_with_env():
    """MUGV_NVTX=1: the nvtx package where installed, then torch.cuda.nvtx without it."""
    r = _probe("1")
    assert r["enabled"] is True
    assert r["backend"] == ("nvtx" if _has_nvtx() else "torch")
    assert r["pushed"] == ["mugv.ada_layer_norm", "pop", "outer", "pop", "fallback", "pop"]
    assert r["fallback_backend"] == "torch"
    assert not r["same_function"] and not r["decorated_is_fn"]


def _has_nvtx() -> bool:
    try:
        import nvtx  # noqa: F401
    except ImportError:
        return False
    return True
