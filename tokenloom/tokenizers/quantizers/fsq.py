"""Finite scalar quantisation (FSQ, Mentzer et al. 2023), as FlexTok uses: a fixed grid instead of a codebook.

Channel ``d`` of the latent is bounded to ``levels[d]`` integer values and rounded (straight-through):

* bound: ``half = (L - 1)(1 + eps) / 2``, ``offset = 0.5`` for even ``L`` else 0,
  ``bounded = tanh(z + atanh(offset / half)) * half - offset``; rounding gives the integers
  ``-(L // 2) .. (L - 1) // 2``;
* code: ``rounded / (L // 2)`` (values in ``[-1, 1]``);
* index: mixed radix with channel 0 least significant, ``index = Σ_d (rounded_d + L_d // 2) · Π_{e<d} L_e``;
  ``vocab = Π levels``.

Why our own instead of ``vector_quantize_pytorch.FSQ``: the math is twenty lines, and ours works on
channel-first latents without hidden projections, returns long indices, validates its arguments with clear
errors and keeps no state in a checkpoint. ``tests/test_tokenizer_fsq.py`` checks that our codes and indices
equal the library's (v1.32, default options) on random inputs, so the two stay the same math.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenloom.tokenizers.quantizers.vq import code_histogram_stats

BOUND_EPS = 1e-3


@dataclass
class FSQOutput:
    """What :meth:`FiniteScalarQuantizer.forward` returns.

    Attributes:
        z_q: ``[B, D, h, w]`` codes in ``[-1, 1]`` (straight-through: gradient → input).
        indices: ``[B, h, w]`` long indices in ``[0, codebook_size)``.
        usage: scalar, fraction of the implicit codebook used in this batch.
        perplexity: scalar, ``exp(entropy)`` of the batch's index histogram.
    """

    z_q: Tensor
    indices: Tensor
    usage: Tensor
    perplexity: Tensor


def check_levels(levels) -> list[int]:
    """Validate FSQ levels: a non-empty list of ints >= 3 (level 2 is not symmetric under the bound)."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty list of ints >= 3, got {levels!r}")
    out = []
    for level in levels:
        if isinstance(level, bool) or not isinstance(level, int) or level < 3:
            raise ValueError(f"levels must be ints >= 3 (e.g. [8, 5, 5, 5]), got {list(levels)!r}")
        out.append(level)
    return out


class FiniteScalarQuantizer(nn.Module):
    """FSQ over ``len(levels)`` channels: ``z: [B, D, h, w]`` → codes on the grid, indices ``[B, h, w]``.

    Args:
        levels: values per channel, e.g. ``[8, 5, 5, 5]`` (1000 codes); each >= 3.
        eps: bound margin (1e-3, as the paper and vector-quantize-pytorch).
    """

    def __init__(self, levels: Sequence[int], eps: float = BOUND_EPS):
        super().__init__()
        levels = check_levels(levels)
        if not 0 <= eps < 1:
            raise ValueError(f"eps must be in [0, 1), got {eps!r}")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        self.eps = float(eps)
        lv = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_half_width", torch.floor(lv / 2), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("_levels_long", torch.tensor(levels, dtype=torch.long), persistent=False)

    def bound(self, z: Tensor) -> Tensor:
        """``z: [..., D]`` → bounded values in ``(-(L//2) - eps', (L-1)//2 + eps')`` per channel (float32)."""
        z = z.float()
        half = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def quantize(self, z: Tensor) -> Tensor:
        """``z: [..., D]`` (channel-last) → codes ``[..., D]`` in ``[-1, 1]``, straight-through rounding."""
        bounded = self.bound(z)
        rounded = bounded + (bounded.round() - bounded).detach()
        return rounded / self._half_width

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """``codes: [..., D]`` on the grid → ``[...]`` long indices."""
        digits = (codes.float() * self._half_width + self._half_width).round().long()
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``indices: [...]`` long in ``[0, codebook_size)`` → ``[..., D]`` float32 codes."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"indices must lie in [0, {self.codebook_size - 1}], got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        digits = (indices.long()[..., None] // self._basis) % self._levels_long
        return (digits.float() - self._half_width) / self._half_width

    def forward(self, z: Tensor) -> FSQOutput:
        """``z: [B, D, h, w]`` → :class:`FSQOutput`."""
        if z.dim() != 4 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape [B, {self.dim}, h, w] (one channel per level), got {tuple(z.shape)}")
        codes = self.quantize(z.permute(0, 2, 3, 1))  # [B, h, w, D]
        indices = self.codes_to_indices(codes.detach())
        usage, perplexity = code_histogram_stats(torch.bincount(indices.flatten(), minlength=self.codebook_size))
        return FSQOutput(z_q=codes.permute(0, 3, 1, 2).to(z.dtype), indices=indices, usage=usage,
                         perplexity=perplexity)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"


__all__ = ["FSQOutput", "FiniteScalarQuantizer", "check_levels"]
