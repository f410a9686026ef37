"""A fifth outside pass: quantize_transformer's nn_agreement bound, batch_list, the zoo's image readers and
MixedViews, and the EfficientNet-Lite0 example's flags, tried with inputs nobody built them for (batch-1 check
sets, bools for bounds, numpy arrays and Datasets as batches, float/16-bit/channels-first/palette images, negative
indices, contradictory flags).

Oracles are computed here with numpy (ImageNet normalisation of a centre crop) or PIL (palette conversion).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from deploycompress.batches import batch_list
from deploycompress.pruning.distill import distill
from deploycompress.zoo import IMAGENET_MEAN, IMAGENET_STD, MixedViews, crops, image_tensors, random_crops

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _rgb_image(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- hf.int8.quantize_transformer: the NN-agreement bound needs rows; bools are not bounds ---------------------


def test_min_nn_agreement_with_a_batch_1_check_set_is_refused_up_front() -> None:
    """2 check rows give no nearest-neighbour figure (NaN): every candidate used to fail late with an Int8Error that
    blamed the calibration text (and a note saying cosine was missed when it was not)."""
    pytest.importorskip("transformers")
    from deploycompress.export import to_onnx
    from deploycompress.hf import Encoder
    from deploycompress.hf.int8 import quantize_transformer
    from test_hf_attention import inputs, tiny_bert
    from test_hf_int8 import feeds

    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    fp32 = to_onnx(Encoder(tiny_bert()), inputs(), dynamic_axes=axes).model
    kw = dict(fuse="plain", flavour="integer", attention_int8=False, repeats=1)
    with pytest.raises(ValueError, match="at least 3 rows .* got 2"):
        quantize_transformer(fp32, feeds(2, 2, 8, 0), feeds(2, 1, 8, 1), min_nn_agreement=0.9, min_cosine=0.5, **kw)
    for bad in ({"min_nn_agreement": True}, {"min_cosine": True}, {"smooth_alpha": False}):  # True is not 1.0; False is not "off"
        with pytest.raises(ValueError, match=next(iter(bad))):
            quantize_transformer(fp32, feeds(2, 2, 8, 0), **kw, **bad)


def test_nn_agreement_counts_a_tie_in_the_reference_as_the_same_neighbour() -> None:
    """One sentence three times (rows 0-2): in fp32 they are equally near each other; int8 noise that picks row 2 instead
    of row 1 keeps the neighbour (it was counted as changed: 0.5 here). Row 4 really changes (its neighbour 3 -> 5)."""
    from deploycompress.hf.int8 import nn_agreement

    ref = np.array([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1]])
    act = ref.copy()
    act[1], act[2], act[4] = [1, 0, 1e-3], [1, 0, 1e-4], [0, 0.1, 0.9]
    # by hand: reference neighbour sets {1,2} {0,2} {0,1} {4} {3} {4}; actual picks 2, 2, 0, 4, 5, 4
    assert nn_agreement([ref], [act]) == pytest.approx(5 / 6)
    assert nn_agreement([ref[:3], ref[3:]], [act[:3], act[3:]]) == pytest.approx(5 / 6)  # rows of the batches together


# --- batches.batch_list: numpy arrays and Datasets are read sample by sample; refused by name -------------------


def test_numpy_arrays_and_datasets_as_batches_are_refused_by_name() -> None:
    x = np.zeros((8, 3), np.float32)
    with pytest.raises(ValueError, match="single numpy array"):
        batch_list(x)  # was 8 "batches" of shape (3,)
    with pytest.raises(ValueError, match="tuple of 2"):
        batch_list((x, x))
    with pytest.raises(ValueError, match="DataLoader"):
        batch_list(TensorDataset(torch.zeros(8, 3)))
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="numpy array"):  # through a public caller, before any step
        distill(student, teacher, x, steps=1)
    assert len(batch_list([torch.zeros(2, 3), torch.zeros(2, 3)])) == 2  # a list of batches stays what it was


# --- zoo: images in other layouts are read right or refused, never clipped/garbled silently --------------------


def _normalised(rgb01: np.ndarray) -> np.ndarray:
    """(H, W, 3) floats in [0, 1] -> (3, H, W) ImageNet-normalised, with numpy."""
    return ((rgb01 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


def test_images_in_other_layouts_read_as_the_same_pixels() -> None:
    rgb = _rgb_image()
    want = rgb.astype(np.float64) / 255
    ways = {
        "uint8 HWC": rgb, "float [0, 1]": rgb / 255.0, "uint8 CHW tensor": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
        "int64": rgb.astype(np.int64), "RGBA": np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], 2), "PIL RGB": Image.fromarray(rgb),
    }  # fmt: skip
    got = image_tensors(ways)
    for name, t in zip(ways, got):
        assert tuple(t.shape) == (3, 20, 30), name
        np.testing.assert_allclose(t.numpy(), want.transpose(2, 0, 1), atol=1e-6, err_msg=name)
    palette = Image.fromarray(rgb).convert("P")  # palette indices are not grey levels
    np.testing.assert_allclose(image_tensors([palette])[0].numpy(), np.asarray(palette.convert("RGB")).transpose(2, 0, 1) / 255, atol=1e-6)
    # crops of a grey image: the centre square at its own size is the grey levels, normalised (was a crash)
    grey = rgb[..., 0]
    c = crops({"g": grey}, size=20, mirror=False, per_photo=1)
    np.testing.assert_allclose(c[0].numpy(), _normalised(np.repeat(grey[:, 5:25, None], 3, 2) / 255.0), atol=1e-4)
    np.testing.assert_allclose(crops({"f": rgb / 255.0}, size=20, mirror=False, per_photo=1)[0].numpy(),
                               _normalised(want[:, 5:25]), atol=1e-4)  # float input was divided by 255 twice


@pytest.mark.parametrize("image, match", [
    (_rgb_image().astype(np.float32), r"\[0, 1\].*divide by 255"),  # 0-255 floats were clipped to white
    (_rgb_image().astype(np.uint16) * 256, "uint16 .*8-bit"),  # 16-bit values were clipped to white
    (np.zeros((4, 20, 30, 3), np.uint8), "shape"),
    (np.zeros((20, 30, 7), np.uint8), "shape"),
])  # fmt: skip
def test_images_that_cannot_be_read_safely_are_refused(image, match) -> None:
    with pytest.raises(ValueError, match=match):
        random_crops({"photo": image}, 2, size=8)
    with pytest.raises(ValueError, match="'photo'"):
        MixedViews({"photo": image}, 1, 2, size=8)


def test_mixed_views_index_like_a_list() -> None:
    mv = MixedViews([_rgb_image(), _rgb_image(seed=1)[..., 0]], steps=3, batch=2, size=9)  # a list; grey next to colour
    torch.testing.assert_close(mv[-1], mv[2])  # was IndexError(-1)
    parts = mv[1:]
    assert len(parts) == 2 and all(torch.equal(a, b) for a, b in zip(parts, (mv[1], mv[2])))
    with pytest.raises(IndexError):
        mv[3]
    with pytest.raises(IndexError):
        mv[-4]
    with pytest.raises(ValueError, match="int steps"):
        MixedViews([_rgb_image()], steps=2.0, batch=2)  # len() would raise TypeError in the middle of distill


# --- examples/efficientnet_lite0.py: flags that would fail or be ignored after minutes are refused at once ------


@pytest.mark.parametrize("argv, match", [
    (["--distill-steps", "-5"], "distill-steps"),
    (["--distill-steps", "2", "--batch", "1"], "--batch must be >= 2"),  # MixedViews refused it after pruning
    (["--mix-alpha", "0"], "mix-alpha"),
    (["--crops-per-photo", "0"], "crops-per-photo"),
    (["--sparsity", "1.5"], "sparsity"),
    (["--init-student", "missing/student.pt"], "no such file"),
    (["--student", "{pt}", "--distill-steps", "5"], "skips distillation"),  # the steps were ignored
    (["--student", "{pt}", "--init-student", "{pt}"], "skips distillation"),  # the init was overwritten
    (["--init-student", "{pt}", "--criterion", "reconstruction"], "ignored"),  # the init was never loaded
])  # fmt: skip
def test_efficientnet_example_refuses_bad_flags_before_loading_the_model(tmp_path, monkeypatch, capsys, argv, match) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        ex = __import__("efficientnet_lite0")
    finally:
        sys.path.remove(str(EXAMPLES))
    pt = tmp_path / "student.pt"
    torch.save({}, pt)

    def too_late() -> None:
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(ex, "load_efficientnet_lite0", too_late)
    with pytest.raises(SystemExit) as exc:
        ex.main(["--out", str(tmp_path / "out"), *(a.replace("{pt}", str(pt)) for a in argv)])
    assert exc.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_mean_cosine_of_a_scalar_output_compares_its_values_over_the_batches():
    """A graph output of shape () (a score, one per batch) made ``mean_cosine`` fail with ``IndexError``; its
    values over the check batches are now one row, so a scaled-down int8 score is seen (cosine computed here)."""
    from deploycompress.hf.int8 import mean_cosine

    ref = [np.array(1.0, np.float32), np.array(2.0, np.float32), np.array(-1.0, np.float32)]
    got = [np.array(1.0, np.float32), np.array(-2.0, np.float32), np.array(-1.0, np.float32)]
    want = float(np.dot([1, 2, -1], [1, -2, -1]) / (np.linalg.norm([1, 2, -1]) * np.linalg.norm([1, -2, -1])))
    assert mean_cosine(ref, got) == pytest.approx(want) and want < 0
    assert mean_cosine(ref, ref) == pytest.approx(1.0)
    rows = [np.array([[3.0, 4.0]]), np.array([[1.0, 0.0]])]
    assert mean_cosine(rows, [np.array([[4.0, 3.0]]), np.array([[1.0, 0.0]])]) == pytest.approx((24 / 25 + 1) / 2)
