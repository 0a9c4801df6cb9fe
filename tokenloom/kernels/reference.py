"""Plain reference sampler: every SamplingParams field, in DESIGN.md's order, written for clarity.

float32 → guidance → temperature → min-p → top-k → top-p → draw. It is the yardstick the fast paths
(``torch_sampling``, ``triton_sampling``) are tested against, not the path to use for speed.

The sampling contract every path implements (so that the same logits, params and uniforms give the
same token on every path, up to float rounding at a boundary):

* guidance ``x = u + s·(c − u)`` rounded once (skipped when ``s == 1``), tempered logits ``z = x / T``;
  ``T == 0`` is greedy: the first index of ``max x``.
* rank: ``z`` descending, ties broken by the lower vocabulary index.
* weights ``e = exp(z − max z)`` (unnormalised; the best token has weight 1).
* min-p keeps ``e >= min_p``; top-k keeps the ``k`` best-ranked survivors; top-p keeps, among the top-k
  survivors in rank order, each token whose preceding mass is ``< top_p · Z`` (``Z`` = their total mass;
  masses are float32 cumulative sums in rank order).
* draw: inverse CDF in **vocabulary index order** over the kept weights: with ``U`` the row's uniform
  in ``[0, 1)``, the token is the first index whose cumulative kept weight (float64) exceeds ``U · total``.
  The uniforms come from :func:`row_uniforms`, one per row, so row ``i`` depends only on its generator.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.checks import row_values


def row_uniforms(generator, rows: int, device, per_row: int = 1) -> Tensor:
    """``[rows, per_row]`` float64 uniforms in ``[0, 1)``: the only randomness a sampler consumes.

    ``generator`` is None (torch's default generator), one ``torch.Generator`` (all rows from it, in row
    order) or a list of ``rows`` generators (row ``i`` drawn from ``generator[i]`` alone).
    """
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(per_row, generator=g, dtype=torch.float64, device=g.device)
                            for g in generator]).to(device)
    gen_device = device if generator is None else generator.device
    return torch.rand(rows, per_row, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def guided_logits(logits: Tensor, uncond_logits: Tensor | None, guidance_scale: float) -> Tensor:
    """float32 ``uncond + s·(cond − uncond)`` of ``[B, V]`` logits; the logits themselves when ``s == 1``.

    ``s·d + uncond`` is rounded once (``torch.add(..., alpha=s)`` is a fused multiply-add on CPU; the
    Triton kernel uses ``tl.fma``), so every path computes bit-identical guided logits.
    """
    x = logits.float()
    if uncond_logits is None or guidance_scale == 1.0:
        return x
    u = uncond_logits.float()
    return torch.add(u, x - u, alpha=guidance_scale)


def row_params(params: SamplingParams, rows: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``(temperature, top_k, top_p, min_p)`` as ``[B]`` tensors (top_k 0 = off stays 0)."""
    return (row_values(params.temperature, rows, device, torch.float32),
            row_values(params.top_k, rows, device, torch.long),
            row_values(params.top_p, rows, device, torch.float32),
            row_values(params.min_p, rows, device, torch.float32))


def filtered_weights(logits: Tensor, params: SamplingParams, uncond_logits: Tensor | None = None) -> Tensor:
    """Unnormalised kept weights ``[B, V]`` float32 (``exp(z − max z)`` on kept tokens, 0 elsewhere).

    Greedy rows (temperature 0) are one-hot at the first index of the maximum.
    """
    x = guided_logits(logits, uncond_logits, params.guidance_scale)
    b, v = x.shape
    temperature, top_k, top_p, min_p = row_params(params, b, x.device)
    greedy = temperature == 0
    z = x / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    # Rank: z descending, ties by lower index (a stable sort of the descending order).
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(v, device=x.device).expand(b, v))
    # min-p: e >= min_p (e is p / p_max). The survivors are a prefix of the rank order.
    keep = e >= min_p[:, None]
    # top-k over the survivors: the k best ranks.
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, v))
    keep &= ranks < k[:, None]
    # top-p over the top-k survivors, in rank order: keep while the mass before a token is < p · Z.
    w = torch.where(keep, e, torch.zeros_like(e))
    w_sorted = torch.gather(w, 1, order)
    cum = torch.cumsum(w_sorted, dim=-1)
    keep_sorted = (cum - w_sorted < top_p[:, None] * cum[:, -1:]) | (top_p[:, None] >= 1)  # 1.0 = off
    keep &= torch.zeros_like(keep).scatter_(1, order, keep_sorted)
    w = torch.where(keep, e, torch.zeros_like(e))
    if greedy.any():
        onehot = torch.zeros_like(w).scatter_(1, x.argmax(dim=-1, keepdim=True), 1.0)
        w = torch.where(greedy[:, None], onehot, w)
    return w


def filtered_probs(logits: Tensor, params: SamplingParams, uncond_logits: Tensor | None = None) -> Tensor:
    """The renormalised, truncated distribution the sampler draws from.

    Args:
        logits: ``[B, V]`` conditional logits.
        params: sampling params (scalars or per-row ``[B]`` tensors); temperature 0 gives one-hot argmax.
        uncond_logits: ``[B, V]`` unconditional logits for guidance, or None.

    Returns:
        ``[B, V]`` float32 probabilities, each row summing to 1.
    """
    w = filtered_weights(logits, params, uncond_logits)
    return w / w.sum(dim=-1, keepdim=True)


def draw_index_order(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw in index order: ``weights [B, V] >= 0`` (not all 0), ``uniforms [B]`` → ``[B]`` long.

    The token is the first index whose cumulative weight (summed in float64) exceeds ``U · total``; if
    rounding leaves none, the last index with positive weight.
    """
    cum = torch.cumsum(weights.double(), dim=-1)
    target = uniforms.to(torch.float64) * cum[:, -1]
    over = cum > target[:, None]
    idx = torch.arange(weights.shape[-1], device=weights.device)
    last_kept = torch.where(weights > 0, idx, -1).amax(dim=-1)
    first_over = torch.where(over, idx, weights.shape[-1]).amin(dim=-1)
    return torch.where(over.any(dim=-1), first_over, last_kept)


def sample_reference(
    logits: Tensor,
    params: SamplingParams,
    uniforms: Tensor,
    uncond_logits: Tensor | None = None,
) -> Tensor:
    """Draw one index per row of ``logits: [B, V]`` given ``uniforms: [B]`` (see :func:`row_uniforms`)."""
    return draw_index_order(filtered_weights(logits, params, uncond_logits), uniforms)
