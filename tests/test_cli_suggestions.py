"""Every "did you mean" of the command line names the closest spellings (difflib), not the first names."""

from __future__ import annotations

import pytest

from deploycompress.cli import main
from deploycompress.suggest import closest, did_you_mean


def _stderr(capsys, argv):
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


def test_helper_orders_by_similarity_not_alphabet():
    names = ["alexnet", "convnext_base", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert closest("resnet81", names)[0] == "resnet18"
    assert did_you_mean("zzz", names) == ""
    assert did_you_mean("resnet81", names).startswith(" (did you mean 'resnet18'")


@pytest.mark.parametrize("argv, wanted, unwanted", [
    (["build", "--torchvision", "resnet81", "--precision", "fp32", "--input-shape", "1,3,8,8", "--out", "{tmp}/o"], "did you mean 'resnet18'", "alexnet"),
    (["biuld"], "did you mean 'build'?", None),
    (["build", "--precision", "int9", "--out", "{tmp}/o"], "did you mean 'int8'?", None),
    (["build", "--backend", "tensort", "--out", "{tmp}/o"], "did you mean 'tensorrt'?", None),
    (["build", "--precison", "int8", "--out", "{tmp}/o"], "did you mean '--precision'", None),
    (["inspect", "x.onnx", "--targt", "tensorrt"], "did you mean '--target'?", None),
    (["build", "--model", "deploycompress.zoo.digits:DigitNet", "--precision", "fp32", "--input-shape", "1,1,8,8", "--out", "{tmp}/o"],
     "did you mean 'DigitsNet'", None),
])
def test_cli_suggests_the_closest_name(tmp_path, capsys, argv, wanted, unwanted):
    code, err = _stderr(capsys, [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    assert wanted in err
    if unwanted:
        assert unwanted not in err
    assert not (tmp_path / "o").exists()


def test_recipe_pruner_name_suggests_the_closest(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {factory: 'deploycompress.zoo.digits:DigitsNet'}\ninput_shape: [1, 1, 8, 8]\n"
                      "prune: {pruner: L1NromPruner, config_list: [{sparsity: 0.5, op_types: [Conv2d]}]}\n")
    code, err = _stderr(capsys, ["build", "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert code == 2 and "did you mean 'L1NormPruner'" in err
