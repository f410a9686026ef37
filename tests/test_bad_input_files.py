"""Bad masks files and calibration JSON: each refused with the file named, a pickle refused without
being unpickled (a payload that would create a file proves it never ran), nothing written, and
build_engine refusing them before any step."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deploycompress as dc
import deploycompress.engine as engine
from deploycompress.checks import read_json_file
from deploycompress.errors import MaskError
from deploycompress.quantization.calib_config import CalibConfig, CalibConfigError


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))


class Payload:
    """Unpickling this creates ``marker``: if the file exists afterwards, the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture()
def spy(monkeypatch):
    started: list[str] = []
    sp, ex = sys.modules["deploycompress.speedup"], sys.modules["deploycompress.export"]
    monkeypatch.setattr(sp, "speedup", lambda *a, **k: started.append("speedup"))
    monkeypatch.setattr(ex, "to_onnx", lambda *a, **k: started.append("to_onnx"))
    return started


def _good_masks() -> dict:
    return {"0": {"weight": torch.ones(4, 3, 3, 3, dtype=torch.bool)}}


def _write(tmp_path: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / f"{kind}.pt"
    if kind == "pickle_payload":
        with open(path, "wb") as fh:
            pickle.dump({"0": {"weight": Payload(tmp_path / "PWNED")}}, fh)
        return path, "refused without unpickling"
    if kind == "torch_save_object":
        torch.save({"0": {"weight": Payload(tmp_path / "PWNED")}}, path)
        return path, "refused without unpickling"
    if kind == "truncated":
        torch.save(_good_masks(), path)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        return path, "not a complete torch.save file"
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path, "not a torch.save file"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "is empty"
    if kind == "npy":
        np.save(path, np.ones((4, 3, 3, 3)))
        path = path.rename(tmp_path / "npy.pt") if path.exists() else Path(str(path) + ".npy").rename(tmp_path / "npy.pt")
        return path, "not a torch.save file"
    if kind == "wrong_shape":
        torch.save({"0": {"weight": torch.ones(4, 3, 1, 1, dtype=torch.bool)}}, path)
        return path, "has shape (4, 3, 1, 1)"
    raise AssertionError(kind)


KINDS = ["pickle_payload", "torch_save_object", "truncated", "random", "empty", "npy", "wrong_shape"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_masks_file_is_a_mask_error_naming_the_file(kind, tmp_path):
    path, reason = _write(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(MaskError) as info:
        dc.load_masks(path, model())
    assert str(path) in str(info.value) and reason in str(info.value)
    assert not (tmp_path / "PWNED").exists()  # the payload never ran
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("kind", ["pickle_payload", "truncated"])
def test_build_engine_refuses_a_bad_masks_file_before_any_step(kind, tmp_path, spy):
    path, reason = _write(tmp_path, kind)
    with pytest.raises(dc.EngineError, match=reason):
        engine.build_engine(model(), str(path), example_inputs=torch.randn(1, 3, 8, 8), out_dir=tmp_path / "out", precision="fp32",
                            progress=False)
    assert spy == [] and not (tmp_path / "out").exists() and not (tmp_path / "PWNED").exists()


def test_cli_exit_code_for_a_pickled_masks_file_is_2(tmp_path, spy, capsys):
    from deploycompress.cli import main

    path, _ = _write(tmp_path, "pickle_payload")
    code = main(["build", "--model", "deploycompress.zoo.digits:DigitsNet", "--input-shape", "1,1,8,8", "--precision", "fp32",
                 "--masks", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "refused without unpickling" in err and str(path) in err
    assert spy == [] and not (tmp_path / "PWNED").exists()


# -- calibration JSON ------------------------------------------------------------------------------
def _calib(tmp_path: Path, kind: str) -> tuple[Path, str]:
    path = tmp_path / f"{kind}.json"
    entry = {"scale": [0.1], "zero_point": [0], "bits": 8, "dtype": "int", "axis": None, "symmetric": True, "min": [-1.0], "max": [1.0]}
    if kind == "binary":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
        return path, "not UTF-8 text"
    if kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
        return path, "nested"
    if kind == "moderately_deep":
        path.write_text(json.dumps({"version": 1, "modules": {"a": {"input": {"x": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}}}))
        return path, "levels deep; the limit is 32"
    if kind == "bits_text":
        path.write_text(json.dumps({"version": 1, "modules": {"0": {"input": dict(entry, bits="eight")}}}))
        return path, "'bits' must be an integer"
    if kind == "nni_bits_text":
        path.write_text(json.dumps({"0": {"weight_bits": "eight", "tracked_min_weight": -1.0, "tracked_max_weight": 1.0}}))
        return path, "'weight_bits' must be a number"
    if kind == "not_json":
        path.write_text("{modules: oops")
        return path, "not valid JSON"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["binary", "deep", "moderately_deep", "bits_text", "nni_bits_text", "not_json"])
def test_bad_calibration_file_names_the_file(kind, tmp_path):
    path, reason = _calib(tmp_path, kind)
    with pytest.raises(CalibConfigError) as info:
        CalibConfig.load(path)
    assert str(path) in str(info.value) and reason in str(info.value)


def test_oversized_json_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "big.json"
    path.write_text("[" + "0," * 100 + "0]")
    reads = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or b"")
    with pytest.raises(CalibConfigError, match=r"more than the 64-byte limit"):
        read_json_file(path, "calibration file", CalibConfigError, max_bytes=64)
    assert reads == []


def test_build_engine_refuses_a_bad_calibration_before_any_step(tmp_path, spy):
    path, _ = _calib(tmp_path, "bits_text")
    with pytest.raises(dc.EngineError, match="bits"):
        engine.build_engine(model(), None, str(path), example_inputs=torch.randn(1, 3, 8, 8), out_dir=tmp_path / "out", progress=False)
    assert spy == [] and not (tmp_path / "out").exists()
