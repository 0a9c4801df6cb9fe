"""Residual vector quantisation (SoundStream / RQ-VAE): ``depth`` quantisers, each coding the previous residual.

``z: [B, D, h, w]``; ``r_0 = z``, ``q_i = nearest code of r_i`` (level ``i``'s codebook, or one shared codebook),
``r_{i+1} = r_i − q_i``; the quantised latent of the first ``n`` levels is ``Σ_{i<n} q_i``. Each level is a
:class:`~tokenloom.tokenizers.quantizers.vq.VectorQuantizer` with ``l2_norm=False`` (residuals shrink, so they
must not be renormalised), so nearest codes come from ``tokenloom.kernels.nearest_code`` and EMA updates and
dead-code restarts are available per level.

* Losses: mean over levels of each level's ``codebook_loss + commit_loss`` (``||sg(r_i) − q_i||²`` and
  ``beta·||r_i − sg(q_i)||²``).
* Straight-through once on the sum: ``z + sg(Σ q_i − z)`` (not per level, which would scale the encoder's
  gradient by the depth).
* Quantiser dropout (training only): a fraction ``quantizer_dropout`` of the samples of each batch keeps only a
  random prefix of ``n ~ U{1..depth}`` levels in its quantised latent, so that every prefix decodes (DAC's scheme).
  All levels are still quantised and trained on their residuals.

Why our own instead of ``vector_quantize_pytorch.ResidualVQ``: every VQ-family quantiser must use our exact
nearest-code kernel, and each level is our ``VectorQuantizer`` (same checkpoint layout, EMA and restarts).
``tests/test_tokenizer_rvq.py`` checks that, given the same codebooks, our indices and quantised output equal the
library's ``ResidualVQ`` in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tokenloom.tokenizers.quantizers.vq import VectorQuantizer


@dataclass
class RVQOutput:
    """What :meth:`ResidualVectorQuantizer.forward` returns.

    Attributes:
        z_q: ``[B, D, h, w]`` quantised latent of the kept levels (straight-through).
        indices: ``[B, h, w, depth]`` long, every level.
        codebook_loss: scalar, mean over levels (zero for EMA codebooks).
        commit_loss: scalar, mean over levels, already times ``beta``.
        usage: ``[depth]`` fraction of each level's codebook used in this batch.
        perplexity: ``[depth]``.
        kept_levels: ``[B]`` long, levels summed into ``z_q`` per sample.
    """

    z_q: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commit_loss: Tensor
    usage: Tensor
    perplexity: Tensor
    kept_levels: Tensor


class ResidualVectorQuantizer(nn.Module):
    """``depth`` residual levels of ``num_codes`` codes of dimension ``code_dim``.

    Args:
        depth: number of levels ``D_r``.
        num_codes: codes per codebook.
        code_dim: code dimension.
        shared_codebook: one codebook for all levels (``levels`` then holds one quantiser).
        beta: commitment weight.
        ema_decay, dead_code_threshold, usage_decay, backend: per-level :class:`VectorQuantizer` options.
        quantizer_dropout: fraction of each training batch whose quantised latent keeps a random level prefix.
    """

    def __init__(self, depth: int, num_codes: int, code_dim: int, shared_codebook: bool = False, beta: float = 0.25,
                 ema_decay: float = 0.0, dead_code_threshold: float = 0.0, usage_decay: float = 0.99,
                 quantizer_dropout: float = 0.0, backend: str | None = None):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive int, got {depth!r}")
        if not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be in [0, 1], got {quantizer_dropout!r}")
        self.depth, self.num_codes, self.code_dim = depth, num_codes, code_dim
        self.shared_codebook = bool(shared_codebook)
        self.quantizer_dropout = float(quantizer_dropout)
        self.levels = nn.ModuleList(
            VectorQuantizer(num_codes, code_dim, beta=beta, l2_norm=False, ema_decay=ema_decay,
                            dead_code_threshold=dead_code_threshold, usage_decay=usage_decay, backend=backend)
            for _ in range(1 if self.shared_codebook else depth)
        )

    def level(self, i: int) -> VectorQuantizer:
        """The quantiser of level ``i``."""
        return self.levels[0 if self.shared_codebook else i]

    def _kept_levels(self, batch: int, device) -> Tensor:
        kept = torch.full((batch,), self.depth, dtype=torch.long, device=device)
        if self.training and self.quantizer_dropout > 0 and self.depth > 1:
            drop = torch.rand(batch, device=device) < self.quantizer_dropout
            prefix = torch.randint(1, self.depth + 1, (batch,), device=device)
            kept = torch.where(drop, prefix, kept)
        return kept

    def forward(self, z: Tensor) -> RVQOutput:
        """``z: [B, D, h, w]`` → :class:`RVQOutput` (statistics and dropout in training mode only)."""
        if z.dim() != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"z must have shape [B, {self.code_dim}, h, w], got {tuple(z.shape)}")
        kept = self._kept_levels(z.shape[0], z.device)
        residual, total = z, torch.zeros_like(z)
        indices, usage, perplexity = [], [], []
        codebook_loss = commit_loss = z.new_zeros(())
        for i in range(self.depth):
            out = self.level(i)(residual)
            q = out.z_q.detach()  # the code vectors (value of the straight-through output)
            keep = (kept > i).to(z.dtype)[:, None, None, None]
            total = total + keep * q
            residual = residual - q
            indices.append(out.indices)
            codebook_loss = codebook_loss + out.codebook_loss
            commit_loss = commit_loss + out.commit_loss
            usage.append(out.usage)
            perplexity.append(out.perplexity)
        return RVQOutput(z_q=z + (total - z).detach(), indices=torch.stack(indices, dim=-1),
                         codebook_loss=codebook_loss / self.depth, commit_loss=commit_loss / self.depth,
                         usage=torch.stack(usage), perplexity=torch.stack(perplexity), kept_levels=kept)

    def level_vectors(self, indices: Tensor) -> Tensor:
        """``indices: [..., n]`` long (the first ``n <= depth`` levels) → ``[..., n, D]`` code vectors."""
        n = indices.shape[-1]
        if not 1 <= n <= self.depth:
            raise ValueError(f"indices must have 1..{self.depth} levels in the last dim, got {tuple(indices.shape)}")
        return torch.stack([self.level(i).lookup(indices[..., i]) for i in range(n)], dim=-2)

    def lookup(self, indices: Tensor) -> Tensor:
        """``indices: [..., n]`` long → ``[..., D]`` the sum of the first ``n`` levels' code vectors."""
        return self.level_vectors(indices).sum(dim=-2)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, num_codes={self.num_codes}, code_dim={self.code_dim}, "
                f"shared_codebook={self.shared_codebook}, quantizer_dropout={self.quantizer_dropout}")


__all__ = ["RVQOutput", "ResidualVectorQuantizer"]
