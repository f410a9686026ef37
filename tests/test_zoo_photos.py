"""The unlabelled training photos: disjoint from the evaluated ones, views seeded and preprocessed like the crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("skimage")
pytest.importorskip("sklearn")

from deploycompress.zoo import IMAGENET_MEAN, IMAGENET_STD, extra_photos, photos, random_crops  # noqa: E402


def _thumb(im: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(im[..., :3])).permute(2, 0, 1).float()[None]
    return F.interpolate(t, size=(32, 32), mode="area")[0]


def test_extra_photos_are_rgb_and_none_is_an_evaluation_photo():
    extra, known = extra_photos(), photos()
    assert len(extra) >= 13 and not set(extra) & set(known)
    for name, im in extra.items():
        assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3, name
        for other, ref in known.items():  # compared by content: scikit-image's "cat" is "chelsea"
            if abs(im.shape[0] / im.shape[1] - ref.shape[0] / ref.shape[1]) < 0.02:
                assert float((_thumb(im) - _thumb(ref)).abs().mean()) > 10, (name, other)


def test_random_crops_are_seeded_normalised_views():
    images = {"a": np.full((60, 80, 3), 128, np.uint8), "b": np.zeros((50, 50, 3), np.uint8)}
    x = random_crops(images, 6, size=32, seed=3, jitter=0.0)
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, random_crops(images, 6, size=32, seed=3, jitter=0.0))
    assert not torch.equal(x, random_crops(images, 6, size=32, seed=4, jitter=0.0))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    flat = {round(float(v), 3) for v in (x * std + mean).mul(255).round().unique()}  # each view is one flat photo
    assert flat <= {0.0, 128.0}
    state = torch.get_rng_state()
    random_crops(images, 2, size=16, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched
    with pytest.raises(ValueError, match="n >= 1"):
        random_crops(images, 0)
