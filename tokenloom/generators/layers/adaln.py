"""adaLN: a condition vector sets the scale, shift (and gate) of non-affine LayerNorms (DiT, VAR).

* :class:`AdaLNModulation` — ``SiLU → Linear(cond_dim, n·C)``, output ``[B, 1, n, C]``; chunk ``i`` is
  ``out[:, :, i]``. It is an ``nn.Sequential`` so that a block holding it as ``ada_lin`` has VAR's keys
  (``ada_lin.1.weight``/``ada_lin.1.bias``; index 0 is the parameter-free SiLU).
* :func:`modulate` — ``norm(x) · (1 + scale) + shift``.
* :class:`AdaLNFinalNorm` — the adaLN before the output head (VAR's ``AdaLNBeforeHead``): two chunks in the order
  ``(scale, shift)``.

Our own rather than a library's because VAR's checkpoints fix the key names and the chunk order, and
the shared variant (VAR's ``shared_aln``: one modulation for all blocks plus a per-block learned offset) is a
configuration, not a different module.
"""

from __future__ import annotations

from torch import Tensor, nn


class AdaLNModulation(nn.Sequential):
    """``cond: [B, D]`` → ``[B, 1, chunks, C]`` through ``SiLU`` and ``Linear(D, chunks·C)``.

    Args:
        cond_dim: ``D``, the condition width.
        width: ``C``, the width of the modulated activations.
        chunks: how many ``C``-vectors to produce (6 for a VAR block: gamma1, gamma2, scale1, scale2, shift1,
            shift2; 2 before the head: scale, shift).
    """

    def __init__(self, cond_dim: int, width: int, chunks: int):
        super().__init__(nn.SiLU(), nn.Linear(cond_dim, chunks * width))
        self.width, self.chunks = width, chunks

    def forward(self, cond: Tensor) -> Tensor:
        if cond.dim() != 2:
            raise ValueError(f"adaLN condition must have shape [B, D], got {tuple(cond.shape)}")
        return super().forward(cond).view(-1, 1, self.chunks, self.width)


def modulate(x_normed: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x_normed · (1 + scale) + shift``; ``x_normed: [B, T, C]``, ``scale``/``shift``: ``[B, 1, C]``."""
    return x_normed.mul(scale.add(1)).add_(shift)


class AdaLNFinalNorm(nn.Module):
    """Non-affine LayerNorm modulated by the condition, before the output head.

    ``x: [B, T, C]``, ``cond: [B, D]`` → ``[B, T, C]``. Keys: ``ada_lin.1.weight [2C, D]``, ``ada_lin.1.bias``.
    """

    def __init__(self, width: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_lin = AdaLNModulation(cond_dim, width, 2)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).unbind(2)
        return modulate(self.norm(x), scale, shift)
