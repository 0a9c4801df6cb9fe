"""Vector quantiser with a low-dimensional codebook (LlamaGen style), optional EMA updates and dead-code restarts.

``z: [B, D, h, w]`` → nearest codebook row per position (``tokenloom.kernels.nearest_code``), with the
straight-through estimator ``z + (z_q - z).detach()`` so gradients reach the encoder.

* ``l2_norm=True`` (LlamaGen's default): inputs and codebook rows are L2-normalised *at use time*; the stored
  ``embedding.weight`` is not unit-norm. Distances are then cosine distances.
* Losses (means over all positions and channels): ``codebook_loss = ||sg(z) - z_q||²`` (zero and unused with
  EMA updates) and ``commit_loss = beta · ||z - sg(z_q)||²``.
* ``ema_decay > 0``: the codebook follows an exponential moving average of the vectors assigned to each code
  (``cluster_size``, ``embed_sum`` buffers, Laplace-smoothed) instead of gradients.
* ``dead_code_threshold > 0``: a code whose moving-average assignment count per batch (``code_usage``)
  falls below the threshold is replaced by a random input vector of the current batch (training mode only).
  The average starts at 0, so the first training batch initialises the codebook from encoder outputs.

Why our own instead of vector-quantize-pytorch: the module tree must load LlamaGen's ``quantize.embedding``
checkpoints unchanged, and the nearest-code search must be our kernel (exact, blocked, Triton on GPUs).
EMA and restart statistics are per process (they are not all-reduced across data-parallel ranks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenloom.kernels.nearest_code import nearest_code


@dataclass
class QuantizerOutput:
    """What :meth:`VectorQuantizer.forward` returns.

    Attributes:
        z_q: ``[B, D, h, w]`` quantised latent (straight-through: forward value = codes, gradient → input).
        indices: ``[B, h, w]`` long code indices.
        codebook_loss: scalar (zero with EMA updates).
        commit_loss: scalar, already multiplied by ``beta``.
        usage: scalar, fraction of the codebook used in this batch.
        perplexity: scalar, ``exp(entropy)`` of the batch's code histogram.
    """

    z_q: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commit_loss: Tensor
    usage: Tensor
    perplexity: Tensor


def code_histogram_stats(counts: Tensor) -> tuple[Tensor, Tensor]:
    """``counts: [K]`` → (fraction of codes with a nonzero count, ``exp(entropy)`` of the normalised counts)."""
    counts = counts.float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return (counts > 0).float().mean(), entropy.exp()


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with ``num_codes`` codes of dimension ``code_dim``.

    Args:
        num_codes: codebook size ``K``.
        code_dim: code dimension ``D`` (LlamaGen uses 8).
        beta: commitment loss weight.
        l2_norm: normalise inputs and codes at use time (cosine distance).
        ema_decay: 0 = codebook learnt by gradients; in (0, 1) = EMA codebook updates with this decay.
        dead_code_threshold: 0 = off; else restart codes whose average assignments per batch fall below it.
        usage_decay: decay of the per-code assignment-count average used for restarts.
        backend: nearest-code backend (None = best available; see ``tokenloom.kernels.nearest_code``).
    """

    def __init__(self, num_codes: int, code_dim: int, beta: float = 0.25, l2_norm: bool = True,
                 ema_decay: float = 0.0, dead_code_threshold: float = 0.0, usage_decay: float = 0.99,
                 backend: str | None = None):
        super().__init__()
        _positive_int("num_codes", num_codes)
        _positive_int("code_dim", code_dim)
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 = off), got {ema_decay!r}")
        if not 0.0 < usage_decay < 1.0:
            raise ValueError(f"usage_decay must be in (0, 1), got {usage_decay!r}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0 (0 = off), got {dead_code_threshold!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.num_codes, self.code_dim = num_codes, code_dim
        self.beta, self.l2_norm = float(beta), bool(l2_norm)
        self.ema_decay, self.dead_code_threshold = float(ema_decay), float(dead_code_threshold)
        self.usage_decay, self.backend = float(usage_decay), backend
        self.embedding = nn.Embedding(num_codes, code_dim)
        self.embedding.weight.data.uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if self.ema_decay > 0:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.zeros(num_codes))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())
        if self.dead_code_threshold > 0:
            # Starts at 0: the first training batch restarts every code it does not use, i.e. it initialises
            # the codebook from encoder outputs. A restarted code gets 2x the threshold, so it has about
            # ln 2 / (1 - usage_decay) steps to be picked before it is restarted again.
            self.register_buffer("code_usage", torch.zeros(num_codes))

    def codebook(self) -> Tensor:
        """``[K, D]`` codebook as used (L2-normalised when ``l2_norm``)."""
        weight = self.embedding.weight
        return F.normalize(weight, dim=1) if self.l2_norm else weight

    def lookup(self, indices: Tensor) -> Tensor:
        """``indices: [...]`` long → ``[..., D]`` codebook vectors (normalised when ``l2_norm``)."""
        return F.embedding(indices, self.codebook())

    def forward(self, z: Tensor) -> QuantizerOutput:
        """``z: [B, D, h, w]`` → :class:`QuantizerOutput`; updates EMA/usage statistics in training mode."""
        if z.dim() != 4 or z.shape[1] != self.code_dim:
            raise ValueError(f"z must have shape [B, {self.code_dim}, h, w], got {tuple(z.shape)}")
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D], positions in (b, row, col) order
        if self.l2_norm:
            flat = F.normalize(flat, dim=1)
        codebook = self.codebook()
        indices = nearest_code(flat.detach(), codebook.detach(), backend=self.backend)
        counts = torch.bincount(indices, minlength=self.num_codes)
        if self.training:
            self._update_statistics(flat.detach(), indices, counts)
            codebook = self.codebook()  # EMA updates and restarts change the codes used below
        quant = F.embedding(indices, codebook)
        if self.ema_decay > 0:
            codebook_loss = flat.new_zeros(())
        else:
            codebook_loss = F.mse_loss(quant, flat.detach())
        commit_loss = self.beta * F.mse_loss(flat, quant.detach())
        quant = flat + (quant - flat).detach()  # straight-through estimator
        usage, perplexity = code_histogram_stats(counts)
        return QuantizerOutput(
            z_q=quant.reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous(),
            indices=indices.reshape(b, h, w),
            codebook_loss=codebook_loss,
            commit_loss=commit_loss,
            usage=usage,
            perplexity=perplexity,
        )

    @torch.no_grad()
    def _update_statistics(self, flat: Tensor, indices: Tensor, counts: Tensor) -> None:
        """EMA codebook update and dead-code restarts from one batch (``flat: [N, D]``, ``indices: [N]``)."""
        counts = counts.to(flat.dtype)
        weight = self.embedding.weight
        if self.ema_decay > 0:
            decay = self.ema_decay
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)
            self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
            self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + 1e-5) / (total + self.num_codes * 1e-5) * total
            weight.copy_(self.embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            self.code_usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
            dead = (self.code_usage < self.dead_code_threshold).nonzero().squeeze(1)
            if dead.numel():
                picks = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
                weight[dead] = flat[picks]
                self.code_usage[dead] = 2.0 * self.dead_code_threshold
                if self.ema_decay > 0:
                    self.cluster_size[dead] = 1.0
                    self.embed_sum[dead] = flat[picks]

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, l2_norm={self.l2_norm}, "
                f"ema_decay={self.ema_decay}, dead_code_threshold={self.dead_code_threshold}")


__all__ = ["QuantizerOutput", "VectorQuantizer", "code_histogram_stats"]
