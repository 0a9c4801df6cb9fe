"""Base class of every head: models ``p(token | z)`` for one position given the backbone's ``z``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenloom.config import SamplingParams
from tokenloom.tokens import TokenSpec


class Head(nn.Module):
    """A head for tokens of ``spec`` reading backbone vectors of width ``width``.

    Shapes: ``z: [N, C]`` (any leading dims flattened by the caller), ``target: [N, channels]``.
    """

    kinds: tuple[str, ...] = ()

    def __init__(self, spec: TokenSpec, width: int):
        super().__init__()
        if not isinstance(spec, TokenSpec):
            raise TypeError(f"spec must be a TokenSpec, got {type(spec).__name__}")
        if spec.kind not in self.kinds:
            raise ValueError(
                f"{type(self).__name__} models {self.kinds} tokens but the TokenSpec has kind={spec.kind!r}"
            )
        self.spec = spec
        self.width = width

    def loss(self, z: Tensor, target: Tensor) -> Tensor:
        """Per-position loss ``[N]`` of ``target`` under ``p(· | z)``."""
        raise NotImplementedError

    def sample(
        self,
        z: Tensor,
        params: SamplingParams,
        generator: torch.Generator | None = None,
        z_uncond: Tensor | None = None,
    ) -> Tensor:
        """Draw ``[N, channels]`` token values given ``z: [N, C]`` (and ``z_uncond`` for guidance)."""
        raise NotImplementedError

    def logits(self, z: Tensor) -> Tensor:
        """Categorical and bitwise heads only: ``[N, channels, V]`` logits (V = vocab or 2)."""
        raise NotImplementedError(f"{type(self).__name__} has no logits")
