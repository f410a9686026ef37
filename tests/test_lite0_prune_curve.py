"""tools/lite0_prune_curve.py: points built in separate folders merge into one curve; the table and the plot show them."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("lite0_prune_curve", ROOT / "tools" / "lite0_prune_curve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _point(sparsity: float, removed: float, top1: float) -> dict:
    row = lambda t: {"top1": t, "top5": 0.7, "cosine": 0.8, "mb": 4.0}  # noqa: E731
    return {"sparsity": sparsity, "removed": removed, "params": [4_000_000, 3_600_000], "args": [],
            "rows": {"dense fp32": row(1.0), "dense int8": row(0.9), "pruned fp32": row(top1 - 0.05), "pruned int8": row(top1)},
            "before": None, "refitted": None, "paths": {}}  # fmt: skip


def test_curve_merges_folders_and_tabulates(tmp_path):
    tool = _tool()
    for name, sp, removed, top1 in (("a", 0.25, 0.19, 0.575), ("b", 0.10, 0.072, 0.85)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "curve.json").write_text(json.dumps({"machine": {}, "points": {f"{sp:.2f}": _point(sp, removed, top1)}}))
    curve = tool.load([tmp_path / "a", tmp_path / "b"])
    assert sorted(curve["points"]) == ["0.10", "0.25"]
    curve["timing"] = {"b1": {"fp32": {"ms": 10.0, "x": 1.0}, "dense int8": {"ms": 5.0, "x": 0.5},
                              "0.10": {"ms": 4.9, "x": 0.49}, "0.25": {"ms": 4.6, "x": 0.46}}}  # fmt: skip
    lines = tool.table(curve).splitlines()
    assert lines[2].startswith("| 0 (dense int8) | 0 | 1.00x | - | 0.900 |") and lines[2].endswith("| 0.50x |")
    # sorted by sparsity; params 3.6M / 4M = 0.90x; pruned fp32 = top-1 - 0.05
    assert lines[3] == "| 0.10 | 0.072 | 0.90x | 0.800 | 0.850 | 0.700 | 0.8000 | 0.49x |"
    assert lines[4] == "| 0.25 | 0.190 | 0.90x | 0.525 | 0.575 | 0.700 | 0.8000 | 0.46x |"
    pytest.importorskip("matplotlib")
    import matplotlib.image

    tool.plot(curve, tmp_path / "curve.png")
    assert matplotlib.image.imread(tmp_path / "curve.png").shape[:2] == (440, 704)  # 6.4 x 4.0 in at 110 dpi


def test_curve_refuses_missing_build(tmp_path, capsys):
    tool = _tool()
    with pytest.raises(SystemExit):
        tool.main(["--stage", "time", "--workdir", str(tmp_path)])
    assert "run --stage build first" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--stage", "build", "--workdir", str(tmp_path), "--sparsities", "0.1,1.5"])
    assert "--sparsities must lie in (0, 1)" in capsys.readouterr().err
