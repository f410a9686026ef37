"""Fresh augmented views for distillation by function matching (Beyer et al., 2022, "Knowledge distillation: A good
teacher is patient and consistent"): the teacher and the student see the *same* aggressively augmented view at every
step (the consistent teacher), and every step draws new views (many distinct inputs instead of a fixed crop set).

:class:`MixedViews` is a lazy ``Sequence`` of batches for :func:`deploycompress.pruning.distill.distill` (which runs
teacher and student on the same batch): Inception-style random resized crops, flips and colour jitter
(:func:`deploycompress.zoo.random_crops`), then torchvision's ``v2.MixUp`` / ``v2.CutMix`` between the views of a
batch, so the teacher's function is also matched between the photos. All augmentations are torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .photos import image_tensors, views_of

__all__ = ["MIXES", "MixedViews"]

#: how the views of a batch are mixed: none, torchvision's MixUp (Zhang et al., 2018), CutMix (Yun et al., 2019),
#: or one of the two drawn per batch
MIXES = ("none", "mixup", "cutmix", "both")


class MixedViews(Sequence):
    """``steps`` lazy batches of ``batch`` fresh random views of ``images`` (name -> ``(H, W, 3)`` uint8 or ``(H, W)``
    grey, or a list; RGBA, channels-first tensors, float in [0, 1] and PIL images are read too, anything else is refused:
    :func:`deploycompress.zoo.image_tensors`), each ``(batch, 3, size, size)`` float32, ImageNet-normalised.

    Batch ``i`` is drawn with seed ``seed + i`` when asked for (the same ``i`` gives the same batch, ``-1`` the last, as
    for a list; nothing is kept):
    :func:`random_crops` (``RandomResizedCrop(size, scale)``, flip, ``ColorJitter(jitter)``), then ``mix``:
    ``"mixup"``: ``v2.MixUp(alpha)`` blends the batch with itself rolled by one (one ratio per batch, drawn from
    Beta(alpha, alpha)); ``"cutmix"``: ``v2.CutMix(alpha)`` pastes a box of the rolled batch; ``"both"``: one of the two
    per batch; ``"none"``: the views unmixed. No labels are involved: function matching distils the teacher's
    output on whatever it is shown. Never give it the photos you evaluate on.

    Raises ``ValueError`` for an unknown ``mix``, ``steps``/``batch`` not ints >= 1 (``batch`` < 2 with mixing), no
    images or an image it cannot read safely (e.g. float in [0, 255]), at construction.
    """

    def __init__(self, images: dict[str, np.ndarray], steps: int, batch: int, *, seed: int = 1000, mix: str = "mixup", alpha: float = 1.0,
                 size: int = 224, scale: tuple[float, float] = (0.1, 1.0), jitter: float = 0.3) -> None:  # fmt: skip
        if mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, got {mix!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, batch)):
            raise ValueError(f"MixedViews needs int steps and batch, got steps={steps!r}, batch={batch!r}")
        if steps < 1 or batch < (2 if mix != "none" else 1):
            raise ValueError(f"MixedViews needs steps >= 1 and batch >= {2 if mix != 'none' else 1} (mix={mix!r}), got steps={steps}, batch={batch}")
        if not images:
            raise ValueError("MixedViews needs at least one image")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.images, self.steps, self.batch, self.seed = images, steps, batch, seed
        self._tensors = image_tensors(images)  # converted once, cropped at every step
        self.mix, self.alpha, self.size, self.scale, self.jitter = mix, alpha, size, scale, jitter

    def __len__(self) -> int:
        return self.steps

    def _mixer(self):  # noqa: ANN202 - a torchvision transform
        from torchvision.transforms import v2

        mixes = {"mixup": v2.MixUp(alpha=self.alpha, num_classes=1), "cutmix": v2.CutMix(alpha=self.alpha, num_classes=1)}
        return v2.RandomChoice(list(mixes.values())) if self.mix == "both" else mixes[self.mix]

    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(self.steps))]
        if not -self.steps <= i < self.steps:
            raise IndexError(f"MixedViews index {i} out of range for {self.steps} batches")
        i %= self.steps  # a negative index counts from the end, as for a list
        views = views_of(self._tensors, self.batch, size=self.size, seed=self.seed + i, scale=self.scale, jitter=self.jitter)
        if self.mix == "none":
            return views
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator: not the caller's
            torch.manual_seed(self.seed + i)
            mixed, _ = self._mixer()(views, torch.zeros(len(views), dtype=torch.long))  # labels unused: one dummy class
        return mixed
