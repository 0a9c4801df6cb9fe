"""Class-conditional image folders in torchvision's ``ImageFolder`` layout: ``root/<class name>/<image>``.

Items: ``{"image": float32 [3, S, S] in [-1, 1], "label": class index (sorted class names), "caption": the class
name with ``_`` as spaces}``. Images are converted to RGB, resized so the short side is ``image_size`` (bicubic,
antialiased) and centre-cropped, as ADM/LlamaGen prepare ImageNet (without their repeated box downsampling).

Unreadable files (truncated, not an image) are found when the folder is opened (each file's header is checked
with PIL's ``verify``), skipped, counted in :attr:`ImageFolderDataset.skipped` and reported in one warning, so a
training run never dies mid-epoch on a bad file. A missing folder, a folder without class subfolders or without
any readable image raises a ``ValueError`` naming the path.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes


def load_rgb(path, image_size: int) -> torch.Tensor:
    """The image at ``path`` (a path or a binary file object) → ``[3, image_size, image_size]`` float32 in
    [-1, 1] (short side resize, centre crop)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = image_size / min(w, h)
        img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))),
                         Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
        arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def readable(path: str) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types for broken files
        return False


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` as ``{"image", "label", "caption"}`` items (see the module docstring).

    Args:
        root: the folder.
        image_size: output side ``S`` (8..1024).
        check_images: verify every file when opening (skips unreadable ones); False trusts the folder.
    """

    def __init__(self, root: str, image_size: int = 32, check_images: bool = True):
        if not isinstance(image_size, int) or not 8 <= image_size <= 1024:
            raise ValueError(f"image_size={image_size!r} must be an int in [8, 1024]")
        if not os.path.isdir(root):
            raise ValueError(f"image folder root={root!r} does not exist or is not a directory")
        try:
            classes, class_to_idx = find_classes(root)
        except FileNotFoundError as err:
            raise ValueError(f"image folder root={root!r} has no class subfolders (expected root/<class>/<image>)"
                             ) from err
        samples, skipped = [], []
        for name in classes:
            folder = os.path.join(root, name)
            for dirpath, _dirs, files in sorted(os.walk(folder, followlinks=True)):
                for file in sorted(files):
                    if not file.lower().endswith(IMG_EXTENSIONS):
                        continue
                    path = os.path.join(dirpath, file)
                    if check_images and not readable(path):
                        skipped.append(path)
                        continue
                    samples.append((path, class_to_idx[name]))
        if skipped:
            warnings.warn(f"image folder {root!r}: skipped {len(skipped)} unreadable image(s), e.g. {skipped[:3]}",
                          stacklevel=2)
        if not samples:
            raise ValueError(f"image folder root={root!r} holds no readable images with extensions {IMG_EXTENSIONS} "
                             f"in its class subfolders {classes}")
        self.root, self.image_size = root, image_size
        self.classes, self.class_to_idx = classes, class_to_idx
        self.class_names = [c.replace("_", " ") for c in classes]
        self.num_classes = len(classes)
        self.samples = samples
        self.skipped = len(skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        path, label = self.samples[index]
        return {"image": load_rgb(path, self.image_size), "label": label, "caption": self.class_names[label]}


__all__ = ["ImageFolderDataset", "load_rgb", "readable"]
