"""Encode a data set once with a tokenizer: in memory (:func:`pretokenize`) or into token shards on disk
(:func:`write_token_shards`, the format of :mod:`tokenloom.data.token_shards`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from tokenloom.data.token_shards import FORMAT, INDEX, TENSORS

CONDITIONS = ("class", "text", "none")
TextEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]


@torch.no_grad()
def encode_batches(tokenizer, dataset: Dataset, *, condition: str = "class", batch_size: int = 128,
                   text_encoder: TextEncoder | None = None, progress: bool = True) -> Iterator[tuple]:
    """Yield ``(tokens [B, L, C], *condition tensors)`` per batch (see :func:`pretokenize`)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if condition == "text" and text_encoder is None:
        raise ValueError("condition='text' needs a text_encoder(captions) -> (features, mask)")
    was_training = bool(getattr(tokenizer, "training", False))
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()
    device = getattr(tokenizer, "device", torch.device("cpu"))
    try:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for batch in tqdm(loader, disable=not progress, desc="pretokenize", leave=False):
            tokens = tokenizer.encode(batch["image"].to(device)).data.cpu()
            if condition == "class":
                if "label" not in batch:
                    raise ValueError("condition='class' needs items with a 'label' (this data set has none)")
                yield tokens, torch.as_tensor(batch["label"]).long()
            elif condition == "text":
                f, m = text_encoder(list(batch["caption"]))
                yield tokens, f.cpu(), torch.ones(f.shape[:2], dtype=torch.bool) if m is None else m.cpu().bool()
            else:
                yield (tokens,)
    finally:
        if was_training:
            tokenizer.train()


def pretokenize(tokenizer, dataset: Dataset, *, condition: str = "class", batch_size: int = 128,
                text_encoder: TextEncoder | None = None, progress: bool = True) -> TensorDataset:
    """Encode every item's ``"image"`` once with ``tokenizer.encode``.

    Args:
        tokenizer: any object with ``encode(images [B, 3, H, W]) -> Tokens`` (an ImageTokenizer); run in eval mode.
        dataset: items are dicts with ``"image"`` and, per ``condition``, ``"label"`` or ``"caption"``.
        condition: ``"class"`` → ``TensorDataset(tokens, labels)``; ``"text"`` → ``(tokens, features, mask)`` with
            ``text_encoder(captions) -> (features [B, Lc, Cc], mask [B, Lc] bool or None)``; ``"none"`` →
            ``(tokens,)``.

    Returns:
        a ``TensorDataset`` whose first tensor is ``tokens [N, L, C]``.
    """
    parts = list(encode_batches(tokenizer, dataset, condition=condition, batch_size=batch_size,
                                text_encoder=text_encoder, progress=progress))
    if not parts:
        raise ValueError(f"data set {type(dataset).__name__} yielded no items to pre-tokenise")
    return TensorDataset(*[torch.cat(column) for column in zip(*parts)])


def write_token_shards(tokenizer, dataset: Dataset, root: str, *, condition: str = "class", shard_size: int = 10000,
                       batch_size: int = 128, text_encoder: TextEncoder | None = None, progress: bool = True,
                       source: dict | None = None) -> dict:
    """Encode ``dataset`` into ``root`` as safetensors shards of ``shard_size`` rows + ``index.json`` (written
    last, atomically). Returns the index."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if os.path.exists(os.path.join(root, INDEX)):
        raise ValueError(f"{root!r} already holds token shards ({INDEX}); choose an empty folder")
    os.makedirs(root, exist_ok=True)
    names = TENSORS[condition] if condition in TENSORS else None
    shards, pending, count = [], [], 0

    def flush(rows: list[tuple]) -> None:
        columns = [torch.cat(c) for c in zip(*rows)]
        name = f"shard-{len(shards):05d}.safetensors"
        save_file({n: t.contiguous() for n, t in zip(names, columns)}, os.path.join(root, name))
        shards.append({"file": name, "count": int(columns[0].shape[0])})

    for batch in encode_batches(tokenizer, dataset, condition=condition, batch_size=batch_size,
                                text_encoder=text_encoder, progress=progress):
        pending.append(batch)
        count += batch[0].shape[0]
        while count >= shard_size:
            rows = [torch.cat(c) for c in zip(*pending)]
            flush([tuple(t[:shard_size] for t in rows)])
            rest = tuple(t[shard_size:] for t in rows)
            pending, count = ([rest] if rest[0].shape[0] else []), count - shard_size
    if pending:
        flush(pending)
    if not shards:
        raise ValueError(f"data set {type(dataset).__name__} yielded no items to pre-tokenise")
    index = {"format": FORMAT, "version": 1, "spec": tokenizer.spec.to_dict(), "condition": condition,
             "tensors": list(names), "num_items": sum(s["count"] for s in shards), "shards": shards,
             "source": source or {}}
    tmp = os.path.join(root, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, INDEX))
    return index


__all__ = ["CONDITIONS", "encode_batches", "pretokenize", "write_token_shards"]
