"""Lookup-free quantisation (LFQ, MAGVIT-v2 / Open-MAGVIT2): each latent channel becomes one bit.

``z: [B, d, h, w]`` → ``q = where(z > 0, +s, -s)`` per channel (``s = code_scale``), straight-through
``z + (q - z).detach()``; the bits ``(z > 0)`` are the tokens (spec kind ``bits``, ``d`` bits per position).
:class:`~tokenloom.tokenizers.quantizers.bsq.BinarySphericalQuantizer` is the same with ``z`` L2-normalised
first and ``s = 1/sqrt(d)`` (codes on the unit sphere).

Entropy penalty (MAGVIT-v2). The soft assignment of a (projected) latent ``x`` to the ``2^d`` codes ``c`` is
``p(c | x) ∝ exp(-τ ||x - c||²) ∝ exp(2τ x·c)`` (``τ = inv_temperature``). Because every code has the same norm
it factorises over bits: ``p(bit_i = 1 | x) = sigmoid(4 τ s x_i)``. Hence

* per-sample entropy ``H(p(c|x))`` = ``Σ_i H_b(p_i)`` exactly (averaged over positions; minimised: confident bits);
* codebook entropy ``H(E_x p(c|x))`` (maximised: all codes used), either ``"exact"`` (enumerates the ``2^d``
  codes; ``d <= 16``) or ``"factorized"`` = ``Σ_i H_b(E_x p_i)``, BSQ's approximation (an upper bound);
* ``loss = entropy_weight · (per_sample − diversity_gamma · codebook) + commit_weight · ||x − sg(q)||²``.

Entropies are in nats. Bit ``i`` of the tokens is channel ``i``; :func:`bits_to_index` packs bits into an
integer with channel 0 as the most significant bit (vector-quantize-pytorch's order).

Why our own instead of ``vector_quantize_pytorch.LFQ``: its entropy always enumerates all ``2^d`` codes
(memory ``N · 2^d``, impossible for Infinity's 32 bits), it returns packed integer indices rather than bits,
and it runs its own projections. ``tests/test_tokenizer_bitwise.py`` checks that our quantised values, bits,
per-sample and exact codebook entropies equal the library's LFQ (and BSQ = ``LFQ(spherical=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenloom.tokenizers.quantizers.multiscale import ScaleQuantized

CODEBOOK_ENTROPY_MODES = ("exact", "factorized")
MAX_EXACT_BITS = 16
_PROB_EPS = 1e-12


@dataclass
class BitQuantizerOutput:
    """What :meth:`LookupFreeQuantizer.forward` returns.

    Attributes:
        z_q: ``[B, d, h, w]`` quantised latent (straight-through).
        bits: ``[B, h, w, d]`` long 0/1.
        loss: scalar, the weighted entropy penalty plus commitment loss.
        per_sample_entropy: scalar (nats, unweighted).
        codebook_entropy: scalar (nats, unweighted).
        commit_loss: scalar (unweighted).
        bit_balance: scalar, mean over bits of ``min(P(1), P(0)) / 0.5`` in this batch (1 = perfectly balanced).
    """

    z_q: Tensor
    bits: Tensor
    loss: Tensor
    per_sample_entropy: Tensor
    codebook_entropy: Tensor
    commit_loss: Tensor
    bit_balance: Tensor


def binary_entropy(p: Tensor) -> Tensor:
    """Elementwise entropy (nats) of a Bernoulli(``p``)."""
    q = 1 - p
    return -(p * p.clamp(min=_PROB_EPS).log() + q * q.clamp(min=_PROB_EPS).log())


def bits_to_index(bits: Tensor) -> Tensor:
    """``bits: [..., d]`` 0/1 → ``[...]`` long, channel 0 = most significant bit."""
    d = bits.shape[-1]
    weights = 2 ** torch.arange(d - 1, -1, -1, device=bits.device)
    return (bits.long() * weights).sum(dim=-1)


def entropy_terms(x: Tensor, code_scale: float, inv_temperature: float, mode: str) -> tuple[Tensor, Tensor]:
    """Per-sample and codebook entropy (nats) of the soft code assignment of ``x: [N, d]`` (see module doc).

    Returns ``(mean per-sample entropy, codebook entropy)``, both scalars.
    """
    logits = 4.0 * inv_temperature * code_scale * x.float()  # log-odds of bit = 1
    p1 = torch.sigmoid(logits)
    per_sample = binary_entropy(p1).sum(dim=-1).mean()
    if mode == "factorized":
        return per_sample, binary_entropy(p1.mean(dim=0)).sum()
    d = x.shape[-1]
    codes = (torch.arange(2**d, device=x.device)[:, None] >> torch.arange(d - 1, -1, -1, device=x.device)) & 1
    log_p1, log_p0 = F.logsigmoid(logits), F.logsigmoid(-logits)  # [N, d]
    log_probs = log_p1 @ codes.t().float() + log_p0 @ (1 - codes).t().float()  # [N, 2^d]
    avg = log_probs.exp().mean(dim=0)
    codebook = -(avg * avg.clamp(min=_PROB_EPS).log()).sum()
    return per_sample, codebook


class LookupFreeQuantizer(nn.Module):
    """Sign quantiser over ``bits`` channels with the MAGVIT-v2 entropy penalty; no parameters.

    Args:
        bits: latent channels = bits per position ``d``.
        code_scale: code magnitude ``s`` (codes are ``±s``).
        entropy_weight: weight of ``per_sample − diversity_gamma · codebook`` entropy.
        diversity_gamma: weight of the codebook entropy inside the penalty.
        commit_weight: weight of ``||x − sg(q)||²``.
        inv_temperature: ``τ`` of the soft assignment.
        codebook_entropy: ``"exact"`` or ``"factorized"``.
    """

    def __init__(self, bits: int, code_scale: float = 1.0, entropy_weight: float = 0.1, diversity_gamma: float = 1.0,
                 commit_weight: float = 0.25, inv_temperature: float = 100.0, codebook_entropy: str = "exact"):
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
            raise ValueError(f"bits must be a positive int, got {bits!r}")
        if not inv_temperature > 0:
            raise ValueError(f"inv_temperature must be > 0, got {inv_temperature!r}")
        for name, value in (("entropy_weight", entropy_weight), ("diversity_gamma", diversity_gamma),
                            ("commit_weight", commit_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if codebook_entropy not in CODEBOOK_ENTROPY_MODES:
            raise ValueError(f"codebook_entropy must be one of {CODEBOOK_ENTROPY_MODES}, got {codebook_entropy!r}")
        if codebook_entropy == "exact" and bits > MAX_EXACT_BITS:
            raise ValueError(f"codebook_entropy='exact' enumerates 2**bits codes; use 'factorized' for bits > "
                             f"{MAX_EXACT_BITS}, got bits={bits}")
        if not code_scale > 0:
            raise ValueError(f"code_scale must be > 0, got {code_scale!r}")
        self.bits = bits
        self.code_dim = bits
        self.token_channels = bits
        self.code_scale = float(code_scale)
        self.entropy_weight, self.diversity_gamma = float(entropy_weight), float(diversity_gamma)
        self.commit_weight, self.inv_temperature = float(commit_weight), float(inv_temperature)
        self.codebook_entropy = codebook_entropy

    def project(self, z: Tensor) -> Tensor:
        """The quantiser's view of ``z: [..., d]`` (identity for LFQ; L2-normalised for BSQ)."""
        return z

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """``bits: [..., d]`` 0/1 → ``[..., d]`` float32 codes ``±s``."""
        return (bits.float() * 2 - 1) * self.code_scale

    def forward(self, z: Tensor) -> BitQuantizerOutput:
        """``z: [B, d, h, w]`` → :class:`BitQuantizerOutput` (entropy terms computed in training mode only)."""
        if z.dim() != 4 or z.shape[1] != self.bits:
            raise ValueError(f"z must have shape [B, {self.bits}, h, w] (one channel per bit), got {tuple(z.shape)}")
        x = self.project(z.permute(0, 2, 3, 1).float())  # [B, h, w, d]
        bits = (x > 0).long()
        q = self.bits_to_codes(bits)
        commit = F.mse_loss(x, q)
        zero = x.new_zeros(())
        if self.training and self.entropy_weight > 0:
            per_sample, codebook = entropy_terms(x.reshape(-1, self.bits), self.code_scale, self.inv_temperature,
                                                 self.codebook_entropy)
        else:
            per_sample, codebook = zero, zero
        loss = self.entropy_weight * (per_sample - self.diversity_gamma * codebook) + self.commit_weight * commit
        z_q = x + (q - x).detach()
        ones = bits.float().reshape(-1, self.bits).mean(dim=0)
        balance = (torch.minimum(ones, 1 - ones) / 0.5).mean()
        return BitQuantizerOutput(z_q=z_q.permute(0, 3, 1, 2).to(z.dtype), bits=bits, loss=loss,
                                  per_sample_entropy=per_sample.detach(), codebook_entropy=codebook.detach(),
                                  commit_loss=commit.detach(), bit_balance=balance)

    # ---- the per-scale protocol of MultiScaleResidualQuantizer (see quantizers/multiscale.py) ----
    def quantize_scale(self, z: Tensor) -> ScaleQuantized:
        """``z: [B, d, h, w]`` → ``ScaleQuantized`` with bit codes ``[B, h*w, d]``."""
        out = self(z)
        b, _, h, w = z.shape
        return ScaleQuantized(values=out.z_q, codes=out.bits.reshape(b, h * w, self.bits), loss=out.loss,
                              logs={"per_sample_entropy": out.per_sample_entropy,
                                    "codebook_entropy": out.codebook_entropy, "bit_balance": out.bit_balance})

    def codes_to_latent(self, codes: Tensor, h: int, w: int) -> Tensor:
        """``codes: [B, h*w, d]`` bits → ``[B, d, h, w]`` code vectors."""
        return self.bits_to_codes(codes).reshape(codes.shape[0], h, w, self.bits).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, code_scale={self.code_scale:.4g}, entropy_weight={self.entropy_weight}, "
                f"diversity_gamma={self.diversity_gamma}, commit_weight={self.commit_weight}, "
                f"inv_temperature={self.inv_temperature}, codebook_entropy={self.codebook_entropy!r}")


__all__ = ["BitQuantizerOutput", "CODEBOOK_ENTROPY_MODES", "LookupFreeQuantizer", "binary_entropy",
           "bits_to_index", "entropy_terms"]
