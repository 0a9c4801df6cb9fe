"""Normalisation layers: RMSNorm (LlamaGen/Llama) and LayerNorm, built by one factory.

RMSNorm is our own because LlamaGen computes it in float32 and casts back before the weight
(``weight * norm(x.float()).type_as(x)``); ``torch.nn.RMSNorm`` multiplies in the input dtype, so
checkpoint parity in bf16 would drift. LayerNorm is ``torch.nn.LayerNorm``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

NORMS = ("rms", "layer")


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x², -1) + eps) · weight``, the statistics in float32.

    Args:
        dim: size of the last dimension ``C``.
        eps: added to the mean square (LlamaGen: 1e-5).
    Shapes: ``x: [..., C] -> [..., C]`` (same dtype as ``x``).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float = 1e-5, affine: bool = True) -> nn.Module:
    """``"rms"`` → :class:`RMSNorm`, ``"layer"`` → ``nn.LayerNorm`` (``affine=False``: no weight/bias)."""
    if kind == "rms":
        if not affine:
            raise ValueError("affine=False is only supported for norm='layer', got norm='rms'")
        return RMSNorm(dim, eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
