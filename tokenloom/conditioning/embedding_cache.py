"""A cache of text embeddings for training with a frozen text encoder.

Encoding every caption at every step wastes most of a step on a frozen T5 or CLIP. The cache encodes each
distinct caption once and stores ``features [N, Lc, C]`` and ``mask [N, Lc]`` in safetensors shards. A caption is
found by the sha256 of its UTF-8 bytes, which each shard lists in its safetensors header (so opening a cache reads
headers only, and no file holds the captions themselves). ``index.json`` names the shards and the conditioner's
fingerprint (class, config, tokenizer, weights): reusing a cache with a different encoder is an error, not a
silent mix of embeddings.

Layout::

    index.json                 {"format", "fingerprint", "conditioner", "feature_dim", "feature_length", "shards"}
    shard-00000.safetensors    features, mask; metadata {"keys": JSON list of caption hashes}

Building again with more captions appends shards with only the new ones. Read-back is bit-identical to what
the conditioner produced when the cache was built (in batches of ``batch_size``; a float encoder may differ in the
last bits when the same caption is encoded in a batch of another size).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from tokenloom.conditioning.base import check_prompts
from tokenloom.generators.condition import Condition

FORMAT = "tokenloom.text_embedding_cache/1"
INDEX = "index.json"


def caption_key(caption: str) -> str:
    """The cache key of a caption: sha256 of its UTF-8 bytes, hex."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class TextEmbeddingCache:
    """Read access to a cache folder written by :meth:`build`; callable as a trainer's ``text_encoder``.

    Args:
        folder: the cache folder (must hold ``index.json``).
        conditioner: when given, its fingerprint must match the one the cache was built with.
    """

    def __init__(self, folder, conditioner=None):
        self.folder = Path(folder)
        index_path = self.folder / INDEX
        if not index_path.is_file():
            raise ValueError(f"folder {str(folder)!r} is not a text embedding cache (no {INDEX})")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{str(index_path)!r} has format {self.index.get('format')!r}, expected {FORMAT!r}")
        if conditioner is not None:
            self._check_encoder(conditioner, conditioner.fingerprint())
        self._where: dict[str, tuple[int, int]] = {}
        for s, name in enumerate(self.index["shards"]):
            with safe_open(str(self.folder / name), framework="pt") as f:
                for row, key in enumerate(json.loads(f.metadata()["keys"])):
                    self._where[key] = (s, row)
        self._loaded: dict[int, dict[str, Tensor]] = {}

    def _check_encoder(self, conditioner, fingerprint: str) -> None:
        if fingerprint != self.index["fingerprint"]:
            raise ValueError(f"the cache in {str(self.folder)!r} was built with another text encoder "
                             f"({self.index['conditioner']['class']}, fingerprint {self.index['fingerprint'][:12]}...) "
                             f"than the one given ({type(conditioner).__name__}, {fingerprint[:12]}...)")

    @property
    def feature_dim(self) -> int:
        return self.index["feature_dim"]

    @property
    def feature_length(self) -> int:
        return self.index["feature_length"]

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, caption) -> bool:
        return isinstance(caption, str) and caption_key(caption) in self._where

    def _shard(self, s: int) -> dict[str, Tensor]:
        if s not in self._loaded:
            self._loaded[s] = load_file(str(self.folder / self.index["shards"][s]))
        return self._loaded[s]

    def get(self, captions) -> tuple[Tensor, Tensor]:
        """Captions → (features ``[B, Lc, C]``, mask ``[B, Lc]`` bool), on the CPU, as stored."""
        captions = check_prompts(captions, "captions")
        missing = [c for c in captions if caption_key(c) not in self._where]
        if missing:
            raise KeyError(f"{len(missing)} caption(s) not in the cache {str(self.folder)!r}, e.g. {missing[0]!r}; "
                           "add them with TextEmbeddingCache.build")
        features, masks = [], []
        for c in captions:
            s, row = self._where[caption_key(c)]
            shard = self._shard(s)
            features.append(shard["features"][row])
            masks.append(shard["mask"][row])
        return torch.stack(features), torch.stack(masks)

    __call__ = get  # pretokenize(..., text_encoder=cache): captions -> (features, mask)

    def condition(self, captions, device=None) -> Condition:
        """Captions → the :class:`Condition` the conditioner's ``encode`` gave for them."""
        features, mask = self.get(captions)
        return Condition(features=features, mask=mask).to(device or "cpu")

    @classmethod
    def build(cls, conditioner, captions: Iterable[str], folder, *, batch_size: int = 64, shard_size: int = 4096,
              dtype: torch.dtype | None = None, progress: bool = True) -> TextEmbeddingCache:
        """Encode the captions not yet in ``folder`` with ``conditioner`` (in eval mode) and store them.

        Args:
            conditioner: any text conditioner (``encode(prompts) -> Condition`` with features), used frozen.
            captions: strings; duplicates are encoded once.
            folder: the cache folder, created or extended (the conditioner must match the one it was built with).
            batch_size: prompts per ``encode`` call.
            shard_size: rows per safetensors shard.
            dtype: store features in this float dtype (e.g. ``torch.bfloat16`` to halve the disk); None = as encoded.
            progress: show a progress bar.
        """
        batch_size = _positive_int("batch_size", batch_size)
        shard_size = _positive_int("shard_size", shard_size)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be None or a float torch.dtype, got {dtype!r}")
        if isinstance(captions, str):
            raise TypeError("captions must be an iterable of strings, not one string")
        captions = list(dict.fromkeys(captions))
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise TypeError(f"captions must be strings, got {bad[0]!r}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = conditioner.fingerprint()
        if (folder / INDEX).exists():
            cache = cls(folder)
            cache._check_encoder(conditioner, fingerprint)
            index = cache.index
        else:
            cache = None
            index = {"format": FORMAT, "fingerprint": fingerprint,
                     "conditioner": {"class": type(conditioner).__name__, "config": dict(conditioner.config)},
                     "feature_dim": int(conditioner.feature_dim), "feature_length": int(conditioner.feature_length),
                     "shards": []}
        todo = [c for c in captions if cache is None or c not in cache]
        was_training = conditioner.training
        conditioner.eval()
        try:
            rows_f, rows_m, keys = [], [], []
            bar = tqdm(total=len(todo), disable=not progress, desc="text embeddings", leave=False)
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                with torch.no_grad():
                    cond = conditioner.encode(batch)
                if cond.features is None:
                    raise TypeError(f"{type(conditioner).__name__}.encode gave no text features")
                f = cond.features.detach().cpu()
                m = cond.mask.cpu() if cond.mask is not None else torch.ones(f.shape[:2], dtype=torch.bool)
                rows_f.extend(f.to(dtype) if dtype is not None else f)
                rows_m.extend(m)
                keys.extend(caption_key(c) for c in batch)
                while len(keys) >= shard_size or (keys and i + batch_size >= len(todo)):
                    n = min(shard_size, len(keys))
                    index["shards"].append(cls._write_shard(folder, len(index["shards"]), rows_f[:n], rows_m[:n],
                                                            keys[:n]))
                    rows_f, rows_m, keys = rows_f[n:], rows_m[n:], keys[n:]
                bar.update(len(batch))
            bar.close()
        finally:
            conditioner.train(was_training)
        tmp = folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp, folder / INDEX)
        return cls(folder)

    @staticmethod
    def _write_shard(folder: Path, number: int, features: list[Tensor], masks: list[Tensor], keys: list[str]) -> str:
        name = f"shard-{number:05d}.safetensors"
        save_file({"features": torch.stack(features).contiguous(), "mask": torch.stack(masks).contiguous()},
                  str(folder / name), metadata={"keys": json.dumps(keys), "format": FORMAT})
        return name
