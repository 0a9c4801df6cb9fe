"""Class-balanced generation plans for FID, split over processes reproducibly.

FID on class-conditional models is computed from ``n_per_class`` images of each class (ADM, DiT,
VAR: 50 per class on ImageNet). Every image has a *global index* ``i`` in
``[0, num_classes · n_per_class)``, its class is ``i mod num_classes`` (so any prefix of the plan
and any batch is nearly balanced) and its seed depends only on ``(base_seed, i)``. Rank ``r`` of
``world_size`` processes takes the indices ``r, r + world_size, ...``: the union over ranks is the
whole plan, with no image duplicated or missing, and an image is the same whatever the number of
processes or the batch size — when each image is sampled with its own generator
(:func:`torch_generators`, e.g. diffusers' list-of-generators argument).

Seeds are ``numpy.random.SeedSequence([base_seed, i])`` draws, not ``base_seed + i``: with the
latter, ``base_seed=0`` and ``base_seed=1`` share all but one image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class PlannedImage:
    """One image of a plan: its class ``label``, its ``seed`` and its ``index`` in the whole plan."""

    label: int
    seed: int
    index: int

    @property
    def filename(self) -> str:
        """``"000123_class0042.png"``: unique per plan, sorted by index."""
        return f"{self.index:06d}_class{self.label:04d}.png"


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


def image_seed(base_seed: int, index: int) -> int:
    """The 63-bit seed of image ``index`` (depends on nothing else)."""
    return int(
        np.random.SeedSequence([int(base_seed), int(index)])
        .generate_state(2, dtype=np.uint32)
        .astype(np.uint64)
        .dot(np.array([1 << 31, 1], dtype=np.uint64))
    )


def class_balanced_plan(
    num_classes: int, n_per_class: int, *, world_size: int = 1, rank: int = 0, base_seed: int = 0
) -> list[PlannedImage]:
    """This rank's share of ``num_classes × n_per_class`` images: ``(label, seed, index)`` by index."""
    _check_int("num_classes", num_classes, 1)
    _check_int("n_per_class", n_per_class, 1)
    _check_int("world_size", world_size, 1)
    _check_int("base_seed", base_seed, 0)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an int in [0, world_size) = [0, {world_size})")
    total = num_classes * n_per_class
    return [
        PlannedImage(label=i % num_classes, seed=image_seed(base_seed, i), index=i)
        for i in range(rank, total, world_size)
    ]


def plan_for_accelerator(
    accelerator, num_classes: int, n_per_class: int, *, base_seed: int = 0
) -> list[PlannedImage]:
    """:func:`class_balanced_plan` for this process of an ``accelerate.Accelerator``."""
    return class_balanced_plan(
        num_classes,
        n_per_class,
        world_size=accelerator.num_processes,
        rank=accelerator.process_index,
        base_seed=base_seed,
    )


def torch_generators(
    items: Sequence[PlannedImage], device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One seeded ``torch.Generator`` per planned image (pass the list as a pipeline's ``generator``)."""
    return [torch.Generator(device=device).manual_seed(item.seed) for item in items]


def save_images(images_B3HW: torch.Tensor, folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Write images in [-1, 1] as 8-bit PNGs ``folder/name`` (e.g. ``PlannedImage.filename``)."""
    from PIL import Image

    if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
        raise ValueError(f"images of shape {tuple(images_B3HW.shape)}: expected [B, 3, H, W] in [-1, 1]")
    if len(names) != images_B3HW.shape[0]:
        raise ValueError(f"{len(names)} names for {images_B3HW.shape[0]} images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = ((images_B3HW.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    paths = []
    for array, name in zip(arrays.permute(0, 2, 3, 1).numpy(), names):
        path = folder / name
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths
