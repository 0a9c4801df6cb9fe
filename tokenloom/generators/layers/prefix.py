"""Conditioning as prefix tokens: class embedding, projected text features, or one learned start token.

Each prefix module turns a :class:`~tokenloom.generators.Condition` into ``P`` prefix vectors
(``x: [B, P, C]``) plus an optional key-validity mask (``[B, P]`` bool, False = text padding), and makes the
classifier-free-guidance "null" prefix. During training, each row's condition is replaced by the null one with
probability ``dropout`` (LlamaGen's class/caption dropout).

* class (LlamaGen ``LabelEmbedder``): a table of ``num_classes + 1`` rows; the last row, label
  ``num_classes``, is the null class (and may be passed explicitly as a label).
* text (LlamaGen ``CaptionEmbedder``): features ``[B, Lc, Cc]`` projected to the width by a Linear (or a
  GELU-tanh MLP when ``hidden`` is set); the null condition is a learned ``[Lc, Cc]`` feature.
* none: one learned start token; there is no null condition (guidance is impossible).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from timm.layers import Mlp
from torch import Tensor, nn

from tokenloom.generators.condition import Condition

CONDITIONS = ("class", "text", "none")


class Prefix(NamedTuple):
    x: Tensor  # [B, P, C]
    key_valid: Tensor | None  # [B, P] bool, False = padding; None = all valid


def _check_kind(cond, expected: str) -> Condition:
    if not isinstance(cond, Condition):
        raise TypeError(f"cond must be a tokenloom.generators.Condition, got {type(cond).__name__}")
    if cond.kind != expected:
        need = {"class": "labels=[B] ints", "text": "features=[B, Lc, Cc]", "none": "batch=B only"}[expected]
        raise TypeError(f"this generator is conditioned on {expected!r} (Condition({need})), but cond has kind "
                        f"{cond.kind!r}")
    return cond


def _drop_rows(module: nn.Module, batch: int, device, drop: bool | None) -> Tensor | None:
    """``[B]`` bool rows whose condition is dropped, or None. ``drop=None`` means "when training"."""
    drop = module.training if drop is None else drop
    if not drop or module.dropout <= 0:
        return None
    return torch.rand(batch, device=device) < module.dropout


class ClassPrefix(nn.Module):
    """One prefix token per row from ``cond.labels: [B]`` in ``[0, num_classes]`` (``num_classes`` = null)."""

    length = 1

    def __init__(self, width: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int for condition='class', got {num_classes!r}")
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def check(self, cond) -> Condition:
        cond = _check_kind(cond, "class")
        labels = cond.labels
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"cond.labels must lie in [0, {self.num_classes - 1}] (or {self.num_classes} for the "
                             f"null class), got range [{int(labels.min())}, {int(labels.max())}]")
        return cond

    def forward(self, cond: Condition, drop: bool | None = None) -> Prefix:
        """``drop``: apply condition dropout (None = when training)."""
        labels = self.check(cond).labels
        drop = _drop_rows(self, labels.shape[0], labels.device, drop)
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return Prefix(self.embedding_table(labels)[:, None], None)

    def null(self, batch: int, device=None) -> Prefix:
        labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return Prefix(self.embedding_table(labels)[:, None], None)


class TextPrefix(nn.Module):
    """``cond_len`` prefix tokens per row from ``cond.features: [B, cond_len, cond_dim]`` (+ ``cond.mask``)."""

    def __init__(self, width: int, cond_dim: int, cond_len: int, dropout: float = 0.0, hidden: int | None = None):
        super().__init__()
        for name, value in (("cond_dim", cond_dim), ("cond_len", cond_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int for condition='text', got {value!r}")
        self.cond_dim, self.length, self.dropout = cond_dim, cond_len, dropout
        if hidden is None:
            self.proj = nn.Linear(cond_dim, width)
        else:
            self.proj = Mlp(cond_dim, hidden, width, act_layer=partial(nn.GELU, approximate="tanh"))
        self.null_features = nn.Parameter(torch.randn(cond_len, cond_dim) / cond_dim**0.5)

    def check(self, cond) -> Condition:
        cond = _check_kind(cond, "text")
        b, lc, cc = cond.features.shape
        if (lc, cc) != (self.length, self.cond_dim):
            raise ValueError(f"cond.features must have shape [B, {self.length}, {self.cond_dim}] (cond_len, "
                             f"cond_dim), got {tuple(cond.features.shape)}")
        if cond.mask is not None and (cond.mask.shape != (b, lc) or cond.mask.dtype != torch.bool):
            raise ValueError(f"cond.mask must be a bool tensor of shape [{b}, {lc}], got "
                             f"{cond.mask.dtype} {tuple(cond.mask.shape)}")
        return cond

    def forward(self, cond: Condition, drop: bool | None = None) -> Prefix:
        """``drop``: apply condition dropout (None = when training)."""
        cond = self.check(cond)
        features, mask = cond.features, cond.mask
        drop = _drop_rows(self, features.shape[0], features.device, drop)
        if drop is not None:
            features = torch.where(drop[:, None, None], self.null_features.to(features.dtype), features)
            mask = None if mask is None else mask | drop[:, None]
        return Prefix(self.proj(features), mask)

    def null(self, batch: int, device=None) -> Prefix:
        return Prefix(self.proj(self.null_features).expand(batch, -1, -1), None)


class StartPrefix(nn.Module):
    """Unconditional: one learned start token per row (``Condition(batch=B)``)."""

    length = 1
    dropout = 0.0

    def __init__(self, width: int):
        super().__init__()
        self.start = nn.Parameter(torch.randn(1, 1, width) * 0.02)

    def check(self, cond) -> Condition:
        return _check_kind(cond, "none")

    def forward(self, cond: Condition, drop: bool | None = None) -> Prefix:
        return Prefix(self.start.expand(self.check(cond).batch_size, -1, -1), None)

    def null(self, batch: int, device=None) -> Prefix:
        raise ValueError("an unconditional generator (condition='none') has no null condition; use "
                         "guidance_scale=1.0")


def make_prefix(condition: str, width: int, *, num_classes: int | None = None, cond_dim: int | None = None,
                cond_len: int | None = None, dropout: float = 0.0, text_hidden: int | None = None) -> nn.Module:
    """Build the prefix module for ``condition`` in ``("class", "text", "none")``."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"cond_dropout must lie in [0, 1), got {dropout!r}")
    if condition == "class":
        return ClassPrefix(width, num_classes, dropout)
    if condition == "text":
        return TextPrefix(width, cond_dim, cond_len, dropout, text_hidden)
    if condition == "none":
        return StartPrefix(width)
    raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")


def cat_prefixes(a: Prefix, b: Prefix) -> Prefix:
    """Stack two prefixes along the batch (CFG: conditional rows then null rows)."""
    if a.key_valid is None and b.key_valid is None:
        return Prefix(torch.cat([a.x, b.x]), None)
    ones = lambda p: torch.ones(p.x.shape[:2], dtype=torch.bool, device=p.x.device)
    va = ones(a) if a.key_valid is None else a.key_valid
    vb = ones(b) if b.key_valid is None else b.key_valid
    return Prefix(torch.cat([a.x, b.x]), torch.cat([va, vb]))
