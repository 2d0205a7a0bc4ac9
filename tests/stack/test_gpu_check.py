"""The GPU check harness (``benchmarks.gpu_check``): budget logic (over budget means
skipped and named), derived figures and targets, the summary's columns, JUnit parsing,
offline wheels, and the whole ``--dry-run`` on CPU end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks import gpu_check as gc
from mugv import perf
from mugv_kernels.device import GPU_PEAKS

ROOT = Path(__file__).resolve().parents[2]


def test_plan_skips_and_names_what_does_not_fit():
    run, skipped = gc.plan([("a", 10), ("b", 50), ("c", 5), ("d", 30)], budget_s=40)
    assert run == ["a", "c"]
    assert [n for n, _ in skipped] == ["b", "d"]
    assert "over budget" in skipped[0][1] and "50 s" in skipped[0][1] and "30 s left" in skipped[0][1]
    assert gc.plan([], 10) == ([], [])
    assert gc.plan([("x", 0)], 0) == (["x"], [])


def test_rounds_and_budget():
    assert gc.rounds_for(0.1, 3.0) == 20  # 30 would fit: capped
    assert gc.rounds_for(0.5, 3.0) == 6
    assert gc.rounds_for(10.0, 3.0) == 3  # never fewer than min_rounds
    assert gc.rounds_for(0.0, 3.0) == 20
    now = [100.0]
    b = gc.Budget(60, clock=lambda: now[0])
    assert b.left() == 60 and b.fits(60) and not b.fits(61) and not b.fits(55, reserve_s=10)
    now[0] += 45
    assert b.elapsed() == 45 and b.left() == 15 and not b.fits(20)


class _Args:
    skip: list = []
    case_s = 0.01
    max_rounds = 3
    dry_run = True
    share_tests = share_sanitizer = share_benchmarks = 0.3


def test_run_cases_over_budget_is_skipped_and_reported(tmp_path):
    """A case whose estimate exceeds what is left is recorded as skipped with its reason,
    the next cheaper one still runs, and an estimate follows the last case of the family."""
    args = _Args()
    args.out = str(tmp_path)
    run = gc.Run(args, gc.Budget(1000))
    calls = []

    def make(name):
        def setup():
            calls.append(name)
            return lambda: None

        return setup

    costs = [perf.gelu_cost("g", 10, phase="fwd")]
    cases = [
        gc.Case("fam", "big", "mugv", make("big"), costs, estimate_s=500),
        gc.Case("other", "small", "mugv", make("small"), costs, estimate_s=1),
        gc.Case("other", "small", "eager", make("small-eager"), costs, estimate_s=500),  # estimated from "small"
    ]
    rec = run.run_cases(cases, share_s=5, label="benchmarks")
    by = {(r.family, r.impl): r for r in run.results}
    assert by["fam", "mugv"].status == "skipped" and "over budget" in by["fam", "mugv"].reason
    assert by["other", "mugv"].status == "ok" and by["other", "eager"].status == "ok"
    assert calls == ["small", "small-eager"]
    assert "2 ran, 1 skipped" in rec.detail
    skip = gc.Case("fam", "x", "mugv-cuda", lambda: (_ for _ in ()).throw(gc._Skip("no _C")), costs, estimate_s=0)
    run.run_cases([skip], share_s=5, label="b")
    assert run.results[-1].status == "skipped" and run.results[-1].reason == "no _C"
    gc.evaluate_targets(run.results)
    assert "big" not in gc.summary_table(run.results)  # skipped cases are listed under "Not measured", not in the table


def _result(family, case, impl, median, costs, peaks, flops=None):
    r = gc.CaseResult(family, case, impl, median_s=median)
    gc.figures(r, gc.Case(family, case, impl, lambda: None, costs, flops=flops), peaks)
    return r


def test_figures_targets_and_speedups():
    peaks = GPU_PEAKS["h100"]
    chain = [perf.norm_cost("c", 36002, 3456, phase="fwd", residual=True, gate=True)]
    t_min = chain[0].bytes / peaks.hbm_bytes_per_s
    fast = _result("ada_norm", "fwd", "mugv", t_min / 0.9, chain, peaks)  # 90% of HBM peak
    comp = _result("ada_norm", "fwd", "compile", 1.5 * t_min / 0.9, chain, peaks)
    eager = _result("ada_norm", "fwd", "eager", 3 * t_min / 0.9, chain, peaks)
    assert fast.bound == "memory" and fast.frac_peak == pytest.approx(0.9)
    assert fast.pct_roofline == pytest.approx(90.0) and fast.GB_per_s == pytest.approx(0.9 * peaks.hbm_bytes_per_s / 1e9)
    attn = [perf.varlen_attention_cost("a", [36002], [36002], 48, 72, phase="fwd")]
    t_attn = attn[0].flops / peaks.bf16_flops
    packed = _result("varlen_attention", "fwd", "triton", t_attn / 0.5, attn, peaks)
    padded = _result("varlen_attention", "fwd", "padded", 1.2 * t_attn / 0.5, attn, peaks)
    assert packed.bound == "compute" and packed.frac_peak == pytest.approx(0.5)
    gn = [perf.group_norm_silu_cost("g", 1, 512, 48 * 90 * 160, 32, phase="fwd")]
    gn_ok = _result("group_norm_silu", "fwd", "mugv-triton", gn[0].bytes / peaks.hbm_bytes_per_s / 0.7, gn, peaks)
    results = [fast, comp, eager, packed, padded, gn_ok]
    gc.evaluate_targets(results)
    assert fast.speedup_compile == pytest.approx(1.5) and fast.speedup_eager == pytest.approx(3.0)
    assert fast.met is True and fast.target.startswith(">= 85%")
    assert comp.met is None and comp.target == ""  # baselines carry no target
    assert packed.speedup_eager == pytest.approx(1.2) and packed.met is False  # 1.2x < 1.3x padded
    assert gn_ok.met is False  # 70% < 80%
    table = gc.summary_table(results).splitlines()
    assert table[0] == "| " + " | ".join(gc.SUMMARY_COLUMNS) + " |"
    assert len(table) == 2 + len(results)
    row = dict(zip(gc.SUMMARY_COLUMNS, [c.strip() for c in table[2].strip("|").split("|")]))
    assert row["met"] == "met" and row["vs compile"] == "1.50x" and row["% of roofline"] == "90%"
    assert row["frac of peak"] == "90.0% (HBM)"


def test_parse_junit(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="a" name="t1" time="1.5"/>'
        '<testcase classname="a" name="t2" time="0.1"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="a" name="t3" time="0.2"><failure message="boom"/></testcase>'
        "</testsuite></testsuites>"
    )
    t = gc.parse_junit(xml)
    assert (t["passed"], t["failed"], t["skipped"]) == (1, 1, 1)
    assert t["skip_reasons"] == {"needs a CUDA device": 1} and t["failures"][0]["message"] == "boom"
    assert t["slowest"][0]["test"] == "a::t1"
    assert gc.parse_junit(tmp_path / "missing.xml")["passed"] == 0


def test_install_wheels_offline(tmp_path, monkeypatch):
    """A wheel in the folder is installed into a temporary target with no index, put on
    the path, and named; an empty or missing folder installs nothing."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    assert gc.install_wheels(wheels, print) == (None, [])
    assert gc.install_wheels(tmp_path / "none", print) == (None, [])
    whl = wheels / "mugvprobe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("mugvprobe.py", "VALUE = 42\n")
        z.writestr("mugvprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: mugvprobe\nVersion: 1.0\n")
        z.writestr("mugvprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("mugvprobe-1.0.dist-info/RECORD", "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    target, names = gc.install_wheels(wheels, print)
    assert names == ["mugvprobe==1.0"] and (Path(target) / "mugvprobe.py").exists()
    assert sys.path[0] == target and os.environ["PYTHONPATH"].startswith(target)


def test_dry_run_end_to_end(tmp_path):
    """``--dry-run`` on CPU writes the same files a GPU run writes: one JSONL per family
    with the environment, the tests file and SUMMARY.md with its columns and sections."""
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "COV_CORE_SOURCE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--budget-s", "150", "--peaks", "h100",
         "--out", str(out), "--wheels", str(tmp_path / "no-wheels")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Where the time went" in proc.stdout
    files = {p.name for p in out.iterdir()}
    measured, over_budget = 0, 0
    for fam in ("ada_norm", "rope", "conv3d", "group_norm_silu", "varlen_attention", "dit_block"):
        assert f"{fam}.jsonl" in files, files
        lines = [json.loads(line) for line in (out / f"{fam}.jsonl").read_text().splitlines()]
        assert lines and all(line["device"] and line["torch"] and line["date"] and "shape" in line for line in lines)
        assert all(line["status"] == "ok" or line["reason"] for line in lines)  # a skip always says why
        ok = [line for line in lines if line["status"] == "ok"]
        assert all(line["median_s"] > 0 and line["pct_roofline"] > 0 and line["frac_peak"] > 0 for line in ok)
        measured += bool(ok)
        over_budget += sum("over budget" in (line.get("reason") or "") for line in lines)
    assert measured >= 3  # on a loaded machine the budget may skip some families: they are named
    assert {"SUMMARY.md", "tests.jsonl", "pytest-gpu.log", "gpu_check.log"} <= files
    summary = (out / "SUMMARY.md").read_text()
    assert "| " + " | ".join(gc.SUMMARY_COLUMNS) + " |" in summary
    for section in ("## Steps", "## GPU tests", "## Benchmarks", "## Targets", "## Where the time went"):
        assert section in summary
    assert "DRY RUN" in summary and "| sanitizer |" in summary
    # Whether a case runs over budget depends on this machine's speed; each one that did is named
    # in the summary (the budget logic itself is pinned by the tests above).
    assert summary.count("over budget") >= over_budget
    assert "## Kernel traffic under the interpreter" in summary


def test_aot_table_from_the_json_schema():
    doc = {"schema": 1, "kernels": [
        {"family": "rope", "kernel": "_rope3d_fwd_kernel", "variant": "D=72", "num_warps": 4, "registers": 96,
         "spill_bytes": 0, "shared_bytes": 0, "occupancy": {"warps_per_sm": 64, "limiter": "warps"},
         "mma": {"wgmma": 0, "mma_sync": 0}, "main_load_share_128": 0.9, "ok": True},
    ]}  # fmt: skip
    lines = gc._aot_table(doc).splitlines()
    assert lines[0].startswith("| family | kernel | variant |") and len(lines) == 3
    assert "| rope | _rope3d_fwd_kernel | D=72 | 4 | 96 | 0 | 0 | 64 | warps | 0 | 0 | 90% | True |" == lines[2]
    assert "unrecognized" in gc._aot_table([1, 2])
