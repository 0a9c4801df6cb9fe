"""Categorical head: a softmax over the codebook for ``index`` tokens (LlamaGen's ``output`` layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenloom import kernels
from tokenloom.config import SamplingParams
from tokenloom.heads import register
from tokenloom.heads.base import Head
from tokenloom.tokens import TokenSpec


@register("categorical")
class CategoricalHead(Head):
    """``Linear(width, vocab · depth)`` → logits ``[N, depth, V]``; loss = cross entropy; sampling via kernels.

    Args:
        spec: an ``index`` TokenSpec; ``depth > 1`` (RVQ) is not supported yet.
        width: backbone width ``C``.
        bias: bias of the projection (LlamaGen's ``output`` has none).
    """

    kinds = ("index",)

    def __init__(self, spec: TokenSpec, width: int, bias: bool = False):
        super().__init__(spec, width)
        if spec.depth != 1:
            raise NotImplementedError(
                f"CategoricalHead supports depth=1 tokens only for now; got a TokenSpec with depth={spec.depth} "
                "(RVQ depth > 1 needs a depth transformer or factorised head, not yet implemented)"
            )
        self.proj = nn.Linear(width, spec.vocab_size * spec.depth, bias=bias)

    def logits(self, z: Tensor) -> Tensor:
        """``z: [N, C]`` → float32 logits ``[N, depth, V]``."""
        return self.proj(z).float().unflatten(-1, (self.spec.depth, self.spec.vocab_size))

    def loss(self, z: Tensor, target: Tensor) -> Tensor:
        """Cross entropy of ``target: [N, depth]`` long → ``[N]`` (mean over depth)."""
        logits = self.logits(z)
        if target.shape != logits.shape[:2]:
            raise ValueError(f"target must have shape {tuple(logits.shape[:2])} ([N, depth]), got "
                             f"{tuple(target.shape)}")
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten().long(), reduction="none")
        return ce.view(target.shape).mean(-1)

    def sample(self, z: Tensor, params: SamplingParams, generator: torch.Generator | list | None = None,
               z_uncond: Tensor | None = None) -> Tensor:
        """Draw ``[N, depth]`` codes from ``z: [N, C]``; guidance from ``z_uncond: [N, C]`` when given."""
        return self.sample_logits(self.logits(z), params, generator,
                                  None if z_uncond is None else self.logits(z_uncond))

    def sample_logits(self, logits: Tensor, params: SamplingParams, generator=None,
                      uncond_logits: Tensor | None = None) -> Tensor:
        """Draw ``[N, depth]`` codes from logits ``[N, depth, V]`` (speculative decoders reuse logits)."""
        n, depth, v = logits.shape
        flat_u = None if uncond_logits is None else uncond_logits.reshape(n * depth, v)
        codes = kernels.sample(logits.reshape(n * depth, v), params, generator, uncond_logits=flat_u)
        return codes.view(n, depth)
