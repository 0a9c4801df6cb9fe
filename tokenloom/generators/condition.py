"""What a generator is conditioned on: class labels, text features, or nothing."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Condition:
    """A batch of conditions. Exactly one of ``labels``/``features`` is set, or neither (unconditional).

    Args:
        labels: ``[B]`` long class indices.
        features: ``[B, Lc, Cc]`` float per-token text features (from a conditioner).
        mask: ``[B, Lc]`` bool, True where ``features`` holds a real token (optional).
        batch: batch size when unconditional.
        uncond_features, uncond_mask: features for the unconditional branch of classifier-free guidance
            (negative prompts); None means the generator's learned null condition.
    """

    labels: Tensor | None = None
    features: Tensor | None = None
    mask: Tensor | None = None
    batch: int | None = None
    uncond_features: Tensor | None = None
    uncond_mask: Tensor | None = None

    def __post_init__(self):
        if self.labels is not None and self.features is not None:
            raise ValueError("Condition takes labels or features, not both")
        if self.labels is not None:
            if not isinstance(self.labels, Tensor) or self.labels.dim() != 1 or self.labels.is_floating_point():
                raise TypeError(f"Condition.labels must be a 1D integer tensor [B], got {self.labels!r}")
            self.labels = self.labels.long()
        if self.features is not None:
            if not isinstance(self.features, Tensor) or self.features.dim() != 3:
                raise TypeError("Condition.features must be a float tensor [B, Lc, Cc], got "
                                f"{getattr(self.features, 'shape', type(self.features))}")
        if self.uncond_features is not None and (self.features is None
                                                 or self.uncond_features.shape != self.features.shape):
            raise ValueError("Condition.uncond_features must have the shape of features, got "
                             f"{tuple(self.uncond_features.shape)}")
        if self.labels is None and self.features is None and (self.batch is None or self.batch < 1):
            raise ValueError(f"an unconditional Condition needs batch >= 1, got {self.batch!r}")

    @property
    def kind(self) -> str:
        return "class" if self.labels is not None else "text" if self.features is not None else "none"

    @property
    def batch_size(self) -> int:
        if self.labels is not None:
            return self.labels.shape[0]
        if self.features is not None:
            return self.features.shape[0]
        return self.batch

    @property
    def device(self) -> torch.device:
        t = self.labels if self.labels is not None else self.features
        return t.device if t is not None else torch.device("cpu")

    def to(self, device) -> Condition:
        move = lambda t: None if t is None else t.to(device)
        return Condition(move(self.labels), move(self.features), move(self.mask), self.batch,
                         move(self.uncond_features), move(self.uncond_mask))

    def select(self, index: Tensor) -> Condition:
        """Rows ``index`` of the batch (also used to repeat: ``index = arange(B).repeat_interleave(n)``)."""
        pick = lambda t: None if t is None else t[index]
        return Condition(pick(self.labels), pick(self.features), pick(self.mask),
                         None if self.batch is None else len(index), pick(self.uncond_features),
                         pick(self.uncond_mask))


def as_condition(cond, batch_size: int | None = None) -> Condition:
    """Accept a Condition, a ``[B]`` label tensor, or None (unconditional, needs ``batch_size``)."""
    if isinstance(cond, Condition):
        return cond
    if cond is None:
        return Condition(batch=batch_size)
    if isinstance(cond, Tensor):
        if cond.dim() == 1 and not cond.is_floating_point():
            return Condition(labels=cond)
        if cond.dim() == 3 and cond.is_floating_point():
            return Condition(features=cond)
    raise TypeError(f"cond must be a Condition, a [B] label tensor, [B, Lc, C] features or None, got {cond!r}")
