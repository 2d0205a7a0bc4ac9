"""``mugv merge``: two copies merge to the copy, two runs to their weighted average, EMA or raw."""

import dataclasses

import pytest
import torch

from mugv.models import DiTConfig, MUGDiT
from mugv.train import checkpoint as ckpt
from mugv.train.ema import EMA
from mugv.train.merge import merge_checkpoints
from mugv.train.runs import load_weights, write_weights_run

CFG = DiTConfig(depth=1, hidden_size=48, num_heads=2, in_channels=4, text_dim=16)
INFO = {"dit": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(CFG).items()}}


def _model(seed: int) -> MUGDiT:
    torch.manual_seed(seed)
    m = MUGDiT(CFG, kernels=False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m


def _params(step_dir, source="ema") -> dict:
    m = MUGDiT(CFG, kernels=False)
    load_weights(step_dir, m, source=source)
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_merge_of_copies_and_of_runs(tmp_path):
    a, b = _model(0), _model(1)
    write_weights_run(tmp_path / "a", a.state_dict(), INFO)
    write_weights_run(tmp_path / "b", b.state_dict(), INFO)
    same = merge_checkpoints([tmp_path / "a", tmp_path / "a"], tmp_path / "aa")
    for k, v in _params(same).items():
        torch.testing.assert_close(v, dict(a.named_parameters())[k], rtol=0, atol=0, msg=k)
    out = merge_checkpoints([tmp_path / "a/step_0", tmp_path / "b/checkpoints/step_00000000"], tmp_path / "ab",
                            weights=[3, 1])
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    got = _params(out)
    assert got.keys() == pa.keys()
    for k, v in got.items():
        torch.testing.assert_close(v, 0.75 * pa[k] + 0.25 * pb[k], rtol=1e-6, atol=1e-6, msg=k)
    assert not torch.equal(got["blocks.0.attn.qkv.weight"], pa["blocks.0.attn.qkv.weight"])
    with pytest.raises(FileExistsError):
        merge_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")


def test_merge_reads_ema_or_raw_weights(tmp_path):
    m = _model(2)
    ema = EMA(m, 0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2.0)  # raw weights now differ from the EMA (which holds the first values)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(__import__("json").dumps(INFO))
    ckpt.save_run_state(run, 5, m, None, ema)
    other = tmp_path / "other"
    write_weights_run(other, m.state_dict(), INFO)
    for source, expect in (("ema", lambda k: ema.shadow[k]), ("model", lambda k: dict(m.named_parameters())[k])):
        out = merge_checkpoints([run / "step_5", other], tmp_path / f"m_{source}", source=source)
        for k, v in _params(out).items():
            want = 0.5 * expect(k) + 0.5 * dict(m.named_parameters())[k]
            torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6, msg=k)


def test_merge_errors(tmp_path):
    write_weights_run(tmp_path / "a", _model(0).state_dict(), INFO)
    wide = dataclasses.replace(CFG, hidden_size=96, num_heads=4)
    info = {"dit": {**INFO["dit"], "hidden_size": 96, "num_heads": 4}}
    write_weights_run(tmp_path / "w", MUGDiT(wide, kernels=False).state_dict(), info)
    with pytest.raises(RuntimeError, match="size mismatch"):  # a state that is not the recorded DiT
        write_weights_run(tmp_path / "v", MUGDiT(wide, kernels=False).state_dict(), INFO)
    with pytest.raises(ValueError, match="at least two"):
        merge_checkpoints([tmp_path / "a"], tmp_path / "o")
    with pytest.raises(ValueError, match="2 values for 3"):
        merge_checkpoints([tmp_path / "a"] * 3, tmp_path / "o", weights=[1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        merge_checkpoints([tmp_path / "a"] * 2, tmp_path / "o", weights=[1, -1])
    with pytest.raises(ValueError, match="shape"):
        merge_checkpoints([tmp_path / "a", tmp_path / "w"], tmp_path / "o")
    with pytest.raises(FileNotFoundError):
        merge_checkpoints([tmp_path / "a", tmp_path / "nope"], tmp_path / "o")


def test_merge_cli(tmp_path, capsys):
    from mugv.cli import main

    write_weights_run(tmp_path / "a", _model(0).state_dict(), INFO)
    assert main(["merge", "--inputs", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "o")]) == 0
    assert "average of 2 checkpoints" in capsys.readouterr().out
    assert main(["merge", "--inputs", str(tmp_path / "a"), str(tmp_path / "a"), "--weights", "1",
                 "--out", str(tmp_path / "p")]) == 2
    assert "mugv merge: error: --weights has 1 values for 2" in capsys.readouterr().err
