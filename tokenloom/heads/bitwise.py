"""Bitwise head (Infinity): independent binary logits for each of the ``bits`` of a position.

``Linear(width, 2·bits)`` → logits ``[N, bits, 2]`` (class 0 = bit 0, class 1 = bit 1; Infinity's
``V = 2·codebook_dim`` head reshaped to pairs). The loss is the mean over bits of the binary cross entropy;
sampling draws every bit on its own through ``kernels.sample_bits`` (the index sampler's contract over the two
outcomes of each bit), so guidance, temperature, min-p and top-p act per bit; ``top_k >= 2`` keeps both outcomes
(off), so settings written for index tokens (e.g. VAR's ``top_k=900``) stay valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenloom import kernels
from tokenloom.config import SamplingParams
from tokenloom.heads import register
from tokenloom.heads.base import Head
from tokenloom.tokens import TokenSpec


@register("bitwise")
class BitwiseHead(Head):
    """``z: [N, C]`` → logits ``[N, bits, 2]``; targets ``[N, bits]`` long 0/1.

    Args:
        spec: a ``bits`` TokenSpec.
        width: backbone width ``C``.
        bias: bias of the projection (Infinity's head has one).
    """

    kinds = ("bits",)

    def __init__(self, spec: TokenSpec, width: int, bias: bool = True):
        super().__init__(spec, width)
        self.proj = nn.Linear(width, 2 * spec.bits, bias=bias)

    def logits(self, z: Tensor) -> Tensor:
        """``z: [N, C]`` → float32 logits ``[N, bits, 2]``."""
        return self.proj(z).float().unflatten(-1, (self.spec.bits, 2))

    def loss(self, z: Tensor, target: Tensor) -> Tensor:
        """Binary cross entropy of ``target: [N, bits]`` (0/1) → ``[N]`` (mean over bits)."""
        logits = self.logits(z)
        if target.shape != logits.shape[:2]:
            raise ValueError(f"target must have shape {tuple(logits.shape[:2])} ([N, bits]), got "
                             f"{tuple(target.shape)}")
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten().long(), reduction="none")
        return ce.view(target.shape).mean(-1)

    def sample(self, z: Tensor, params: SamplingParams, generator: torch.Generator | list | None = None,
               z_uncond: Tensor | None = None) -> Tensor:
        """Draw ``[N, bits]`` bits from ``z: [N, C]``; guidance from ``z_uncond: [N, C]`` when given."""
        return self.sample_logits(self.logits(z), params, generator,
                                  None if z_uncond is None else self.logits(z_uncond))

    def sample_logits(self, logits: Tensor, params: SamplingParams, generator=None,
                      uncond_logits: Tensor | None = None) -> Tensor:
        """Draw ``[N, bits]`` bits from logits ``[N, bits, 2]``; per-row params and generators are per ``N``-row."""
        if logits.dim() != 3 or logits.shape[1:] != (self.spec.bits, 2):
            raise ValueError(f"logits must have shape [N, {self.spec.bits}, 2], got {tuple(logits.shape)}")
        return kernels.sample_bits(logits, params, generator, uncond_logits=uncond_logits)
