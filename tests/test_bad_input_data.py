"""Bad data and arguments to build_engine and speedup: refused before any step with the argument named,
nothing written (not even the out_dir's missing parents), and the caller's model untouched."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import deploycompress as dc
import deploycompress.engine as engine
from deploycompress.checks import CheckError, InputWarning, check_batches, check_example_inputs
from deploycompress.errors import InputError, MaskError


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x)))).mean((2, 3))


@pytest.fixture()
def spy(monkeypatch):
    """Records every long step build_engine starts (speedup, export, backend build)."""
    started: list[str] = []
    import sys

    sp, ex = sys.modules["deploycompress.speedup"], sys.modules["deploycompress.export"]

    for module, attr in ((sp, "speedup"), (ex, "to_onnx")):
        monkeypatch.setattr(module, attr, lambda *a, _n=attr, **k: started.append(_n))
    monkeypatch.setattr(engine, "plain_copy", lambda *a, **k: started.append("plain_copy"))
    return started


def _build(tmp_path: Path, **kw):
    model = kw.pop("model", None) or TwoConv().eval()
    args = dict(example_inputs=torch.randn(1, 3, 8, 8), out_dir=tmp_path / "new" / "deeper" / "out", precision="fp32", progress=False)
    args.update(kw)
    return engine.build_engine(model, **args)


@pytest.mark.parametrize("kw, culprit", [
    ({"example_inputs": torch.randn(1, 5, 8, 8)}, "example_inputs ((1, 5, 8, 8) float32) do not run through TwoConv"),
    ({"example_inputs": torch.randint(0, 3, (1, 3, 8, 8))}, "example_inputs ((1, 3, 8, 8) int64)"),
    ({"example_inputs": [torch.randn(1, 3, 8, 8), "x"]}, "example_inputs[1] is str, not a tensor"),
    ({"precision": "int8", "calib_data": torch.randn(8, 3, 8, 8)}, "calib_data is a single tensor (8, 3, 8, 8)"),
    ({"precision": "int8", "calib_data": [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)]}, "calib_data batch 1 has shape (2, 3, 4, 4)"),
    ({"precision": "int8", "calib_data": [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]}, "yield the inputs only"),
    ({"precision": "int8", "calib_data": [torch.full((2, 3, 8, 8), float("nan"))]}, "calib_data batch 0 holds NaN"),
    ({"precision": "int8", "calib_data": [torch.ones(2, 3, 8, 8, dtype=torch.int32)]}, "calib_data batch 0 has dtype torch.int32"),
    ({"eval_inputs": torch.randn(4, 3, 8, 8), "eval_labels": torch.tensor([0, 1, 2])}, "eval_labels has shape (3,)"),
    ({"eval_inputs": torch.randn(4, 3, 8, 8), "eval_labels": torch.rand(4)}, "eval_labels has dtype torch.float32"),
    ({"max_batch_size": -4}, "max_batch_size must be an integer >= 0, got -4"),
    ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
    ({"batch_sizes": [1, 0]}, "batch_sizes [1, 0]"),
    ({"name": "../x"}, "model name '../x' is not a valid Triton model name"),
    ({"backend_options": {"thread": 2}}, "backend_options ['thread']"),
    ({"masks": {"conv1": {"weight": torch.zeros(8, 3, 3, 3, dtype=torch.bool)}}}, "mask conv1.weight removes every weight of 'conv1'"),
])
def test_bad_build_arguments_are_refused_before_any_step(kw, culprit, tmp_path, spy):
    model = kw.pop("model", None) or TwoConv()
    model.train()  # the check runs it in eval mode and must restore this
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError) as info:
        _build(tmp_path, model=model, **kw)
    assert culprit in str(info.value)
    assert spy == []
    assert list(tmp_path.iterdir()) == []  # not even the missing parents of out_dir
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_backend_option_typo_names_the_close_match(tmp_path, spy):
    with pytest.raises(dc.EngineError, match=r"'thread': \['threads'\]"):
        _build(tmp_path, backend_options={"thread": 2})


def test_empty_masks_warn_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "plain_copy", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.warns(InputWarning, match=r"masks is empty"):
        with pytest.raises(RuntimeError, match="stop here"):  # the warning came before the first step
            _build(tmp_path, masks={})


def test_failed_build_removes_the_parents_it_made(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("export exploded")

    import deploycompress.export as ex

    monkeypatch.setattr(ex, "to_onnx", boom)
    with pytest.raises(dc.BuildStepError, match="export exploded"):
        _build(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_speedup_names_a_wrong_example_input():
    model = TwoConv().eval()
    with pytest.raises(CheckError, match=r"example_inputs \(\(1, 4, 8, 8\) float32\) do not run through TwoConv"):
        dc.speedup(model, {"conv1": {"weight": torch.ones(8, 3, 3, 3, dtype=torch.bool)}}, torch.randn(1, 4, 8, 8))


def test_check_batches_accepts_a_dataloader_of_inputs():
    ref = (torch.randn(1, 3, 8, 8),)
    loader = torch.utils.data.DataLoader(torch.randn(10, 3, 8, 8), batch_size=4)
    batches = check_batches(loader, ref)
    assert [b.shape[0] for b in batches] == [4, 4, 2]


def test_keyword_example_inputs_run_by_name():
    class Kw(nn.Module):
        def forward(self, image, scale):
            return image * scale

    inputs = {"image": torch.randn(1, 3), "scale": torch.tensor(2.0)}
    assert check_example_inputs(Kw(), inputs) == inputs
    with pytest.raises(CheckError, match="example_inputs .*image=.*do not run through Kw"):
        check_example_inputs(Kw(), {"image": torch.randn(1, 3)})
