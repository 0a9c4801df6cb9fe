"""Binary spherical quantisation (BSQ, Zhao et al. 2024; Infinity's tokenizer): LFQ on the unit sphere.

``x = z / ||z||`` per position, then ``q = sign(x) / sqrt(d)`` (so ``||q|| = 1``), straight-through. The entropy
penalty is LFQ's with ``s = 1/sqrt(d)`` (``p(bit_i = 1) = sigmoid(4 τ x_i / sqrt(d))``, Infinity's analytic
per-sample entropy) and by default BSQ's factorised codebook entropy, which scales to any ``d``.
Everything else (bits, outputs, per-scale protocol) is :class:`LookupFreeQuantizer`'s.

Tested against ``vector_quantize_pytorch.LFQ(spherical=True)`` in ``tests/test_tokenizer_bitwise.py``.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from tokenloom.tokenizers.quantizers.lfq import LookupFreeQuantizer


class BinarySphericalQuantizer(LookupFreeQuantizer):
    """BSQ over ``bits`` channels (see module docstring); arguments as :class:`LookupFreeQuantizer` without
    ``code_scale`` (fixed to ``1/sqrt(bits)``) and with ``codebook_entropy="factorized"`` by default."""

    def __init__(self, bits: int, entropy_weight: float = 0.1, diversity_gamma: float = 1.0,
                 commit_weight: float = 0.25, inv_temperature: float = 100.0, codebook_entropy: str = "factorized"):
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"bits must be a positive int, got {bits!r}")
        super().__init__(bits, code_scale=1.0 / math.sqrt(bits), entropy_weight=entropy_weight,
                         diversity_gamma=diversity_gamma, commit_weight=commit_weight,
                         inv_temperature=inv_temperature, codebook_entropy=codebook_entropy)

    def project(self, z: Tensor) -> Tensor:
        """``z: [..., d]`` → unit vectors (``F.normalize``, eps 1e-12)."""
        return F.normalize(z, dim=-1)


__all__ = ["BinarySphericalQuantizer"]
