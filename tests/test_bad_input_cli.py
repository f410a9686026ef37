"""Bad command lines, in process (fast): the option is named, the exit code is 2, nothing is written,
and the long steps (pruning, build_engine) never start. Property tests for the one shape grammar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deploycompress as dc
import deploycompress.engine
from deploycompress.cli import main
from deploycompress.cli_args import RecipeError, check_recipe, parse_shape

MODEL = "deploycompress.zoo.digits:DigitsNet"


@pytest.fixture()
def spies(monkeypatch):
    """Records whether a long step started: build_engine or any pruner's compress()."""
    started: list[str] = []

    def fake_build(*a, **k):
        started.append("build_engine")
        raise AssertionError("build_engine must not start on bad input")

    def fake_compress(self, *a, **k):
        started.append(f"{type(self).__name__}.compress")
        raise AssertionError("pruning must not start on bad input")

    monkeypatch.setattr(deploycompress.engine, "build_engine", fake_build)
    monkeypatch.setattr(dc.pruning.base.Pruner, "compress", fake_compress)
    return started


def _argparse_refuses(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, culprit", [
    (["build", "--model", MODEL, "--input-shape", "1,3,16,x16"], "--input-shape"),
    (["build", "--model", MODEL, "--input-shape", "1,1,0,8"], "--input-shape"),
    (["build", "--model", MODEL, "--input-shape", "1x1,8,8"], "--input-shape"),
    (["build", "--model", MODEL, "--input-shape", "1,1,8,8", "--iterations", "0"], "--iterations"),
    (["build", "--model", MODEL, "--input-shape", "1,1,8,8", "--batch-sizes", "1,-8"], "--batch-sizes"),
    (["build", "--model", MODEL, "--input-shape", "1,1,8,8", "--calib", "c.json", "--calib-data", "x.npy"], "--calib-data"),
    (["build", "--model", MODEL, "--torchvision", "resnet18", "--input-shape", "1,3,8,8"], "--torchvision"),
    (["profile", "x.onnx", "--duration", "-1"], "--duration"),
    (["profile", "x.onnx", "--duration", "nan"], "--duration"),
    (["profile", "x.onnx", "--layers", "-2"], "--layers"),
    (["profile", "x.onnx", "--iterations", "0"], "--iterations"),
    (["validate", "x.onnx", "--data", "x.npy", "--min-top1-agreement", "1.5"], "--min-top1-agreement"),
    (["validate", "x.onnx", "--data", "x.npy", "--max-abs-error", "-0.1"], "--max-abs-error"),
])
def test_bad_options_are_refused_by_argparse_naming_the_option(argv, culprit, tmp_path, capsys, spies):
    out = tmp_path / "out"
    err = _argparse_refuses(argv + (["--out", str(out)] if argv[0] == "build" else []), capsys)
    assert culprit in err
    assert not out.exists() and spies == []


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


PRUNE = "prune: {pruner: L1NormPruner, config_list: [{op_types: [Conv2d], sparsity: 0.5}]}\n"


@pytest.mark.parametrize("text, culprit", [
    (f"model: {{factory: '{MODEL}'}}\ninput_shape: [1, 1, 8, 8]\nbuild: {{precison: int8}}\n", "did you mean 'precision'"),
    (f"model: {{factory: '{MODEL}'}}\ninput_shape: [1, 1, 8, 8]\nbuild: {{iterations: 0}}\n", "build.iterations"),
    (f"model: {{factory: '{MODEL}'}}\ninput_shape: '1x1x8xx8'\n", "input_shape"),
    (f"model: {{factory: '{MODEL}'}}\ninput_shape: [1, 1, 8.5, 8]\n", "input_shape"),
    (f"model: {{factory: '{MODEL}'}}\ninput_shape: [1, 1, 8, 8]\nquantize: {{calibratr: minmax}}\n", "did you mean 'calibrator'"),
    (f"model: {{factory: '{MODEL}'}}\ninput_shape: [1, 1, 8, 8]\nquantize: {{calibrator: minmx}}\n", "did you mean 'minmax'"),
    (f"model: {{factory: '{MODEL}'}}\ninput_shape: [1, 1, 8, 8]\n" + PRUNE.replace("L1NormPruner", "L1NromPruner"), "L1NormPruner"),
    (f"model: {{factory: '{MODEL}'}}\ninput_shape: [1, 1, 8, 8]\nquantize: {{calibration: c.json, data: x.npy}}\n", "not both"),
])
def test_bad_recipes_are_refused_before_any_step(text, culprit, tmp_path, capsys, spies):
    out = tmp_path / "out"
    code = main(["build", "--recipe", str(_recipe(tmp_path, text)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert culprit in err
    assert not out.exists() and spies == []


def test_non_empty_out_is_refused_before_pruning_and_fine_tuning(tmp_path, capsys, spies):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = _recipe(tmp_path, f"model: {{factory: '{MODEL}'}}\ninput_shape: [1, 1, 8, 8]\n" + PRUNE)
    assert main(["build", "--recipe", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and str(out) in err
    assert spies == [] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_missing_calibration_file_is_named_before_the_model_is_built(tmp_path, capsys, spies, monkeypatch):
    built = []
    monkeypatch.setattr(deploycompress.cli, "_load_model", lambda *a, **k: built.append(1))
    assert main(["build", "--model", MODEL, "--input-shape", "1,1,8,8", "--calib", str(tmp_path / "nope.json"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert built == [] and spies == [] and not (tmp_path / "out").exists()


def test_json_failure_is_one_json_document_on_stdout(tmp_path, capsys):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert main(["inspect", str(empty), "--json"]) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["exit_code"] == 2 and doc["error_type"] == "UsageError" and "empty.onnx" in doc["error"]


def test_json_stdout_holds_only_the_document_even_when_the_step_prints(tmp_path, capfd, monkeypatch):
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(tmp_path / "m.onnx"), dynamo=False)
    import deploycompress.export.onnx_export as export

    original = export.tensor_specs

    def chatty(*a, **k):  # a library printing to stdout, at Python level and at the descriptor
        print("graph dump from a library")
        import os

        os.write(1, b"C-level chatter\n")
        return original(*a, **k)

    monkeypatch.setattr(export, "tensor_specs", chatty)
    assert main(["inspect", str(tmp_path / "m.onnx"), "--json"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["ops"] == {"Gemm": 1}
    assert "C-level chatter" not in out and "graph dump" not in out
    assert "C-level chatter" in err and "graph dump" in err  # moved, not lost


# -- the shape grammar, by property ----------------------------------------------------------------
dims = st.lists(st.integers(min_value=1, max_value=10**6), min_size=1, max_size=6)


@given(dims, st.sampled_from(["x", ","]))
def test_every_positive_shape_round_trips(values, sep):
    assert parse_shape(sep.join(map(str, values))) == values
    assert parse_shape(values) == values


@settings(max_examples=300)
@given(st.text(alphabet="0123456789x,-+ .X\t", max_size=14))
def test_anything_accepted_is_exactly_positive_ints_with_one_separator(text):
    try:
        values = parse_shape(text, "--input-shape")
    except ValueError as exc:
        assert "--input-shape" in str(exc)
        return
    stripped = text.strip()
    assert all(v >= 1 for v in values)
    assert stripped in {"x".join(map(str, values)), ",".join(map(str, values))}


@given(st.lists(st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=3)), min_size=1, max_size=4),
       st.lists(st.integers(min_value=1, max_value=64), max_size=3))
def test_a_list_with_any_non_positive_int_is_refused(bad, good):
    with pytest.raises(ValueError, match="input_shape"):
        parse_shape(good + bad, "input_shape")


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12))
def test_unknown_recipe_keys_are_always_named(key):
    from deploycompress.cli_args import RECIPE_SCHEMA

    section = RECIPE_SCHEMA["build"]
    if key in section:
        return
    with pytest.raises(RecipeError) as info:
        check_recipe({"build": {key: 1}})
    assert repr(key) in str(info.value) and "build" in str(info.value)
