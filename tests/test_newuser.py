"""What a new user runs first: ``python -m deploycompress``, quiet builds."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

import deploycompress as dc

ROOT = Path(__file__).resolve().parents[1]


def test_python_dash_m_runs_the_command():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "deploycompress", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for sub in ("build", "profile", "validate", "inspect"):
        assert sub in out.stdout
    bad = subprocess.run([sys.executable, "-m", "deploycompress", "biuld"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_progress_false_hides_the_calibration_bar(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(1, 1, 8, 8)
    dc.build_engine(model, None, None, example_inputs=x, precision="int8", out_dir=tmp_path / "b", calib_data=[x, x],
                    progress=False, iterations=1, warmup=0, compare_fp32=False)
    err = capsys.readouterr().err
    assert "calibrating" not in err
