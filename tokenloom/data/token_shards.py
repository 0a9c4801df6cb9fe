"""Pre-tokenised data sets on disk: safetensors shards plus a JSON index (as LlamaGen trains from codes).

Layout (written by :func:`tokenloom.training.pretokenize.write_token_shards` / ``scripts/pretokenize.py``)::

    root/index.json              {"format": "tokenloom-token-shards", "version": 1, "spec": TokenSpec dict,
                                  "condition": "class" | "text" | "none", "tensors": ["tokens", "labels"],
                                  "num_items": N, "shards": [{"file": "shard-00000.safetensors", "count": n}],
                                  "source": {...}}
    root/shard-00000.safetensors {"tokens": [n, L, C], "labels": [n]}   (text: "features" [n, Lc, Cc], "mask")

``index.json`` is written last and atomically, so a folder without it is an unfinished write.
Items are tuples in ``tensors`` order, like a ``TensorDataset`` row, so the generator trainer reads either.
"""

from __future__ import annotations

import bisect
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset, TensorDataset

from tokenloom.tokens import TokenSpec

FORMAT = "tokenloom-token-shards"
INDEX = "index.json"
TENSORS = {"class": ("tokens", "labels"), "text": ("tokens", "features", "mask"), "none": ("tokens",)}


def read_index(root: str) -> dict:
    path = os.path.join(str(root), INDEX)
    if not os.path.isfile(path):
        raise ValueError(f"root={str(root)!r} is not a token-shard folder (no {INDEX}; an unfinished write "
                         f"leaves none)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} index (format={index.get('format')!r})")
    return index


class TokenShardDataset(Dataset):
    """Rows of a token-shard folder as tuples ``(tokens [L, C], *condition)``.

    Args:
        root: the folder.
        in_memory: load every shard at once (fast; a ``TensorDataset`` inside); False reads rows lazily from the
            memory-mapped safetensors files (for sets larger than memory).
    """

    def __init__(self, root: str, in_memory: bool = True):
        index = read_index(root)
        self.root, self.index = str(root), index
        self.spec = TokenSpec.from_dict(index["spec"])
        self.condition = index["condition"]
        self.names = tuple(index["tensors"])
        self.counts = [s["count"] for s in index["shards"]]
        self.files = [os.path.join(self.root, s["file"]) for s in index["shards"]]
        self.offsets = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        if self.offsets[-1] != index["num_items"] or index["num_items"] == 0:
            raise ValueError(f"token shards at {root!r}: index says {index['num_items']} items, shards hold "
                             f"{self.offsets[-1]}")
        self._tensors = None
        self._handles: dict[int, object] = {}
        if in_memory:
            parts = [load_file(f) for f in self.files]
            self._tensors = TensorDataset(*[torch.cat([p[n] for p in parts]) for n in self.names])

    @property
    def tensors(self) -> tuple[torch.Tensor, ...] | None:
        return None if self._tensors is None else self._tensors.tensors

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> tuple:
        if self._tensors is not None:
            return self._tensors[i]
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        s = bisect.bisect_right(self.offsets, i) - 1
        if s not in self._handles:
            self._handles[s] = safe_open(self.files[s], framework="pt")
        j = i - self.offsets[s]
        return tuple(self._handles[s].get_slice(n)[j:j + 1][0] for n in self.names)

    def __getstate__(self):  # DataLoader workers reopen the files
        return {**self.__dict__, "_handles": {}}


__all__ = ["FORMAT", "INDEX", "TENSORS", "TokenShardDataset", "read_index"]
