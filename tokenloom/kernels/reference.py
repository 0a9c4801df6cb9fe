"""Plain reference sampler: every SamplingParams field, in DESIGN.md's order, written for clarity.

float32 → guidance → temperature → min-p → top-k → top-p → draw (``torch.multinomial``).
It is the yardstick the fast paths are tested against, not the path to use for speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.checks import row_values


def filtered_probs(logits: Tensor, params: SamplingParams, uncond_logits: Tensor | None = None) -> Tensor:
    """The renormalised, truncated distribution the sampler draws from.

    Args:
        logits: ``[B, V]`` conditional logits.
        params: sampling params (scalars or per-row ``[B]`` tensors); temperature 0 gives one-hot argmax.
        uncond_logits: ``[B, V]`` unconditional logits for guidance, or None.

    Returns:
        ``[B, V]`` float32 probabilities, each row summing to 1.
    """
    x = logits.float()
    b, v = x.shape
    if uncond_logits is not None:
        u = uncond_logits.float()
        x = u + params.guidance_scale * (x - u)
    temperature = row_values(params.temperature, b, x.device, torch.float32)
    top_k = row_values(params.top_k, b, x.device, torch.long)
    top_p = row_values(params.top_p, b, x.device, torch.float32)
    min_p = row_values(params.min_p, b, x.device, torch.float32)
    greedy = temperature == 0
    x = x / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    probs = torch.softmax(x, dim=-1)
    # min-p: drop tokens below min_p * max prob.
    keep = probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    # top-k: keep the k largest (ties at the threshold kept by rank: stable sort, lower index first).
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(v, device=x.device).expand(b, v))
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))
    probs = torch.where(ranks < k[:, None], probs, torch.zeros_like(probs))
    # top-p over what is left: keep the smallest prefix (by rank) whose mass reaches p.
    probs = probs / probs.sum(dim=-1, keepdim=True)
    sorted_probs = torch.gather(probs, 1, order)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p[:, None]
    keep_sorted[:, 0] = True
    keep = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if greedy.any():
        onehot = torch.zeros_like(probs).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def sample_reference(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | list[torch.Generator] | None = None,
    uncond_logits: Tensor | None = None,
) -> Tensor:
    """Draw one index per row of ``logits: [B, V]`` → ``[B]`` long."""
    probs = filtered_probs(logits, params, uncond_logits)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[:, 0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
