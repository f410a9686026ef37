"""Function-matching views: fresh, seeded, and mixed exactly as MixUp/CutMix define it (a convex blend of a view
with its neighbour in the batch; a pasted box of the neighbour)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")

from deploycompress.zoo import MixedViews  # noqa: E402


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {f"p{i}": rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(3)}


def test_batches_are_seeded_fresh_and_leave_the_callers_stream_alone():
    views = MixedViews(_images(), steps=4, batch=5, size=24, mix="both")
    assert len(views) == 4
    state = torch.get_rng_state()
    x = views[1]
    assert torch.equal(state, torch.get_rng_state())
    assert x.shape == (5, 3, 24, 24) and x.dtype == torch.float32
    assert torch.equal(x, views[1]) and not torch.equal(x, views[2])
    assert torch.equal(x, MixedViews(_images(), steps=4, batch=5, size=24, mix="both")[1])  # a new object: the same batch
    with pytest.raises(IndexError):
        views[4]


def test_mixup_is_one_convex_blend_with_the_rolled_batch():
    images = _images()
    plain, mixed = MixedViews(images, 3, 6, size=20, mix="none"), MixedViews(images, 3, 6, size=20, mix="mixup")
    for i in range(3):
        v, m = plain[i].double(), mixed[i].double()  # the same seed: the same crops before mixing
        a, b = (v - v.roll(1, 0)).flatten(), (m - v.roll(1, 0)).flatten()
        lam = float(a @ b / (a @ a))  # m = lam * v + (1 - lam) * v.roll(1), lam from least squares
        assert 0.0 <= lam <= 1.0
        assert torch.allclose(m, lam * v + (1 - lam) * v.roll(1, 0), atol=1e-5)


def test_cutmix_pastes_one_box_of_the_rolled_batch():
    images = _images()
    plain, mixed = MixedViews(images, 4, 4, size=32, mix="none"), MixedViews(images, 4, 4, size=32, mix="cutmix")
    boxes = 0
    for i in range(4):
        v, m = plain[i], mixed[i]
        own, other = (m == v).all(1), (m == v.roll(1, 0)).all(1)  # (batch, H, W): which pixels came from where
        assert bool((own | other).all())
        pasted = other & ~own
        assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # the same box in every view of the batch
        ys, xs = torch.nonzero(pasted[0], as_tuple=True)
        if len(ys):
            boxes += 1
            box = torch.zeros_like(pasted[0])
            box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
            assert torch.equal(box & ~own[0], pasted[0])  # a rectangle
    assert boxes >= 1


def test_bad_arguments_are_refused_before_any_view():
    with pytest.raises(ValueError, match="mix must be one of"):
        MixedViews(_images(), 2, 4, mix="mosaic")
    with pytest.raises(ValueError, match="batch >= 2"):
        MixedViews(_images(), 2, 1, mix="mixup")
    with pytest.raises(ValueError, match="at least one image"):
        MixedViews({}, 2, 4)
    assert MixedViews(_images(), 1, 1, size=8, mix="none")[0].shape == (1, 3, 8, 8)
