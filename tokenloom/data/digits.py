"""scikit-learn's bundled handwritten digits (1,797 images, 8×8, grey 0..16) as a torch data set.

Nothing is downloaded: ``sklearn.datasets.load_digits`` ships with scikit-learn.

Items: ``{"image": float32 [3, image_size, image_size] in [-1, 1], "label": 0..9,
"caption": "the digit 3"}``. Grey values ``v`` in 0..16 become ``v / 8 - 1`` (0 → -1 black,
16 → +1 white), are replicated to three channels and resized from 8×8 with bilinear
interpolation (``torch.nn.functional.interpolate``, ``align_corners=False``);
``image_size`` is 8..256 (16 by default).

Split (deterministic, stratified): within each class, in scikit-learn's order, the last 20% of
that class's images (rounded up) are ``"test"``, the rest ``"train"`` — 1,433 / 364 images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

SPLITS = ("train", "test")
TEST_FRACTION = 0.2
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 256


def split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Indices (ascending) of ``split`` in the full digits set: the last 20% of each class is test."""
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[idx[len(idx) - int(np.ceil(TEST_FRACTION * len(idx))):]] = True
    return np.flatnonzero(test if split == "test" else ~test)


class DigitsDataset(Dataset):
    """The scikit-learn digits as ``{"image", "label", "caption"}`` items (see the module docstring)."""

    num_classes = 10
    class_names = [f"the digit {d}" for d in range(10)]

    def __init__(self, split: str = "train", image_size: int = 16):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size={image_size!r} must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]")
        from sklearn.datasets import load_digits

        digits = load_digits()
        keep = split_indices(digits.target, split)
        grey = torch.from_numpy(digits.images[keep].astype(np.float32)) / 8.0 - 1.0  # [N, 8, 8]
        images = grey[:, None].expand(-1, 3, -1, -1)  # [N, 3, 8, 8]
        if image_size != 8:
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.split, self.image_size = split, image_size
        self.images = images.clamp(-1.0, 1.0).contiguous()  # [N, 3, H, W]
        self.labels = torch.from_numpy(digits.target[keep].astype(np.int64))  # [N]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index])
        return {"image": self.images[index], "label": label, "caption": f"the digit {label}"}
