"""Data sets reachable by name from a recipe's ``data:`` section, and in-memory caching of small ones.

``build_dataset("image_folder", root="photos", image_size=64)`` → the class named in :data:`DATASETS` called with
the section's other keys (which :mod:`.config_schema` checks against its signature first).
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset
from tqdm.auto import tqdm

# name -> "module:Class"
DATASETS = {
    "shapes": "tokenloom.data.shapes:ShapesDataset",
    "single_shapes": "tokenloom.data.shapes:SingleShapeDataset",
    "digits": "tokenloom.data.digits:DigitsDataset",
    "image_folder": "tokenloom.data.image_folder:ImageFolderDataset",
    "webdataset": "tokenloom.data.webdataset:WebDatasetImages",
    "hf_datasets": "tokenloom.data.hf_datasets:HFImageDataset",
    "token_shards": "tokenloom.data.token_shards:TokenShardDataset",
}

CACHE_LIMIT_BYTES = 1 << 30  # data sets up to 1 GiB of float32 images are rendered once into memory


def dataset_class(name: str) -> type:
    if name not in DATASETS:
        import difflib

        close = difflib.get_close_matches(str(name), list(DATASETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown data set {name!r}{hint}; available: {sorted(DATASETS)}")
    module, cls = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_dataset(name: str, **config) -> Dataset:
    """A data set by recipe name (see :data:`DATASETS`), e.g. ``build_dataset("shapes", split="test")``."""
    return dataset_class(name)(**config)


def images_of(batch) -> Tensor:
    """The image tensor of a batch: ``batch["image"]``, ``batch[0]`` or the batch itself."""
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def cache_images(dataset: Dataset, progress: bool = True, batch_size: int = 256) -> TensorDataset:
    """Render every image of ``dataset`` once into memory: a ``TensorDataset`` of ``[N, 3, H, W]`` float32.

    Procedural data sets (shapes) are rendered in Python per item; caching keeps the training loop fed.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    parts = [images_of(b) for b in tqdm(loader, desc="rendering images", disable=not progress)]
    if not parts:
        raise ValueError(f"data set {type(dataset).__name__} yielded no images")
    return TensorDataset(torch.cat(parts))


def maybe_cache(dataset: Dataset, progress: bool = True) -> Dataset:
    """:func:`cache_images` for map-style data sets of at most :data:`CACHE_LIMIT_BYTES`; others as they are
    (iterable shards stream; large folders are read per item by the DataLoader)."""
    if isinstance(dataset, IterableDataset) or len(dataset) == 0:
        return dataset
    first = images_of(dataset[0])
    if first.numel() * first.element_size() * len(dataset) > CACHE_LIMIT_BYTES:
        return dataset
    return cache_images(dataset, progress=progress)


__all__ = ["DATASETS", "build_dataset", "cache_images", "dataset_class", "images_of", "maybe_cache"]
