"""WebDataset tar shards of image + caption pairs (how large text-to-image sets ship), read with ``webdataset``.

A shard is a tar whose members are grouped by key: ``000123.jpg`` (or ``.jpeg``/``.png``/``.webp``) with its
caption ``000123.txt`` and, optionally, a class index ``000123.cls``. ``urls`` is a list of shard paths, a brace
pattern (``data/shard-{0000..0099}.tar``) or a folder (every ``*.tar`` inside, sorted).

Items: ``{"image": float32 [3, S, S] in [-1, 1] (short-side resize + centre crop), "caption": str,
"label": int}`` (``label`` only when shards carry ``.cls``), prepared as in
:func:`tokenloom.data.image_folder.load_rgb`. Samples whose image cannot be decoded are skipped,
counted in :attr:`WebDatasetImages.skipped` and reported in one warning per pass.

Iterating the data set is one pass over all shards in order (pre-tokenisation, caching). Training reads
:meth:`WebDatasetImages.stream`: endless and deterministic per rank. Epoch ``e`` shuffles the shard order with
seed ``seed + e``; rank ``r`` of ``W`` takes shards ``r, r + W, ...`` (or, with fewer shards than ranks,
every ``W``-th sample) and shuffles samples in a buffer seeded by ``(seed, e, r)``. Resuming skips the samples the
rank already consumed (replayed from the start of its stream and discarded). We use the ``webdataset``
package only to read tars into samples;
its own node splitting and shuffling are process-global and were replaced by this explicit plan so that resumed
runs see exactly the same samples.
"""

from __future__ import annotations

import glob
import io
import os
import random
import warnings
from collections.abc import Iterator

from torch.utils.data import IterableDataset

from tokenloom.data.image_folder import load_rgb

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def expand_urls(urls) -> list[str]:
    """A folder, a brace pattern or a list → sorted shard paths (which must exist)."""
    if isinstance(urls, (list, tuple)):
        paths = [str(u) for u in urls]
    elif os.path.isdir(str(urls)):
        paths = sorted(glob.glob(os.path.join(str(urls), "*.tar")))
    else:
        from braceexpand import braceexpand

        paths = [p for pattern in braceexpand(str(urls)) for p in sorted(glob.glob(pattern)) or [pattern]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"WebDataset shard(s) not found: {missing[:3]} (urls={urls!r})")
    if not paths:
        raise ValueError(f"urls={urls!r} names no WebDataset shards (*.tar)")
    return paths


def _raw_samples(shard: str) -> Iterator[dict]:
    import webdataset as wds

    yield from wds.WebDataset([shard], shardshuffle=False, nodesplitter=None, workersplitter=None,
                              empty_check=False)


class WebDatasetImages(IterableDataset):
    """Image + caption tar shards (see the module docstring).

    Args:
        urls: shard paths, a brace pattern or a folder of ``*.tar``.
        image_size: output side ``S``.
        shuffle_buffer: samples held for shuffling in :meth:`stream` (1 = shard order only).
    """

    def __init__(self, urls, image_size: int = 32, shuffle_buffer: int = 256):
        if not isinstance(image_size, int) or not 8 <= image_size <= 1024:
            raise ValueError(f"image_size={image_size!r} must be an int in [8, 1024]")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer!r} must be a positive int")
        self.shards = expand_urls(urls)
        self.image_size, self.shuffle_buffer = image_size, shuffle_buffer
        self.skipped = 0

    def _item(self, raw: dict) -> dict | None:
        key = next((k for k in IMAGE_KEYS if k in raw), None)
        if key is None:
            return None
        try:
            image = load_rgb(io.BytesIO(raw[key]), self.image_size)
        except Exception:  # PIL raises many types for broken data
            return None
        item = {"image": image, "caption": raw["txt"].decode("utf-8").strip() if "txt" in raw else ""}
        if "cls" in raw:
            item["label"] = int(raw["cls"].decode().strip())
        return item

    def _decoded(self, raws) -> Iterator[dict]:
        skipped = 0
        for raw in raws:
            item = self._item(raw)
            if item is None:
                skipped += 1
                continue
            yield item
        if skipped:
            self.skipped += skipped
            warnings.warn(f"WebDataset: skipped {skipped} sample(s) without a decodable image", stacklevel=2)

    def __iter__(self) -> Iterator[dict]:
        for shard in self.shards:
            yield from self._decoded(_raw_samples(shard))

    def _epoch_raw(self, seed: int, epoch: int, rank: int, world: int) -> Iterator[dict]:
        order = list(self.shards)
        random.Random(seed + epoch).shuffle(order)
        if len(order) >= world:
            raws = (raw for shard in order[rank::world] for raw in _raw_samples(shard))
        else:
            raws = (raw for i, raw in enumerate(r for shard in order for r in _raw_samples(shard))
                    if i % world == rank)
        rng = random.Random(f"{seed}-{epoch}-{rank}")
        buffer: list[dict] = []
        for raw in raws:
            buffer.append(raw)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def stream(self, seed: int, rank: int = 0, world: int = 1, skip: int = 0) -> Iterator[dict]:
        """Endless decoded items for ``rank`` of ``world``, after skipping the first ``skip`` (resumption)."""
        epoch = 0
        while True:
            count = 0
            for item in self._decoded(self._epoch_raw(seed, epoch, rank, world)):
                count += 1
                if skip:
                    skip -= 1
                    continue
                yield item
            if count == 0:
                raise ValueError(f"rank {rank} of {world} got no decodable samples from shards {self.shards[:3]}")
            epoch += 1


__all__ = ["WebDatasetImages", "expand_urls"]
