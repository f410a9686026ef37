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


def test_validate_refuses_data_of_the_wrong_shape_with_exit_2(tmp_path, capsys):
    import numpy as np

    from deploycompress.cli import main

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    dc.build_engine(model, None, None, example_inputs=torch.randn(1, 3, 32, 32), precision="fp32", out_dir=tmp_path / "b",
                    progress=False, iterations=1, warmup=0, compare_fp32=False)
    np.save(tmp_path / "bad.npy", np.random.randn(4, 3, 16, 16).astype("float32"))
    np.save(tmp_path / "good.npy", np.random.randn(4, 3, 32, 32).astype("float32"))
    capsys.readouterr()
    assert main(["validate", str(tmp_path / "b"), "--data", str(tmp_path / "bad.npy"), "--iterations", "1"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "[4, 3, 16, 16]" in err and "32, 32]" in err
    assert main(["validate", str(tmp_path / "b"), "--data", str(tmp_path / "good.npy"), "--iterations", "1"]) == 0


def test_export_names_a_forward_that_refuses_positional_inputs(tmp_path):
    import pytest

    from deploycompress.engine import BuildStepError

    class KeywordOnly(nn.Module):  # like transformers 5's BertModel under the TorchScript exporter
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, flag=None):
            if torch.jit.is_tracing():
                raise TypeError("KeywordOnly.forward() got multiple values for argument 'flag'")
            return self.fc(x)

    with pytest.raises(BuildStepError, match="refused the exporter's positional call"):
        dc.build_engine(KeywordOnly(), None, None, example_inputs=torch.randn(1, 4), precision="fp32",
                        out_dir=tmp_path / "b", progress=False, iterations=1, warmup=0)
    assert not (tmp_path / "b").exists()


def test_hf_bert_model_error_points_to_the_encoder_wrapper(tmp_path):
    import pytest

    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    bert = transformers.BertModel(cfg).eval()
    ids, mask = torch.randint(0, 50, (1, 8)), torch.ones(1, 8, dtype=torch.long)
    try:
        dc.build_engine(bert, None, None, example_inputs=(ids, mask), precision="fp32", out_dir=tmp_path / "raw",
                        progress=False, iterations=1, warmup=0)
    except Exception as exc:  # transformers versions whose forward refuses the exporter's positional call
        assert "deploycompress.hf.Encoder" in str(exc)
    import numpy as np
    import onnxruntime as ort

    from deploycompress.hf import Encoder

    enc = Encoder(bert, pooling="none").eval()
    art = dc.build_engine(enc, None, None, example_inputs=(ids, mask), precision="fp32", out_dir=tmp_path / "b",
                          progress=False, iterations=1, warmup=0)
    sess = ort.InferenceSession(str(art.artifact_path), providers=["CPUExecutionProvider"])
    ids2 = torch.randint(0, 50, (1, 8))
    got = sess.run(None, {"input_ids": ids2.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = bert(input_ids=ids2, attention_mask=mask).last_hidden_state.numpy()
    assert np.abs(got - want).max() < 1e-4


def test_int8_build_of_a_model_with_multihead_attention(tmp_path):
    """nn.MultiheadAttention reads out_proj.weight directly, so out_proj cannot be wrapped: it is left
    float with a named warning and the int8 engine still tracks the float PyTorch model."""
    import numpy as np
    import onnxruntime as ort
    import pytest

    from deploycompress.quantization.quantizer import UncalledModuleWarning
    from conformance_models import MHANet

    torch.manual_seed(0)
    model = MHANet().eval()
    x = torch.randn(1, 5, 8)
    with pytest.warns(UncalledModuleWarning, match="attn.out_proj"):
        art = dc.build_engine(model, None, None, example_inputs=x, precision="int8", out_dir=tmp_path / "b",
                              calib_data=[torch.randn(1, 5, 8) for _ in range(4)], progress=False, iterations=1, warmup=0)
    sess = ort.InferenceSession(str(art.artifact_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() + 1e-3
    assert isinstance(model.attn.out_proj, nn.Linear)  # the caller's model is untouched
