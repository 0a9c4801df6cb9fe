"""Relaxed speculative acceptance with a total-variation budget: the shared core of LANTERN and grouped decoding.

Both methods accept a draft token ``x`` on the strength of the target's mass on tokens *like* ``x`` — its latent
neighbours (LANTERN) or a dynamically formed group of visually valid tokens (GSD) — instead of on ``x`` alone.
Applied literally (accept with ``min(1, p(A(x)) / q(x))`` for a set ``A(x)`` chosen after seeing ``x``) the output
distribution is not controlled: with two drafts that each borrow ``delta`` from a different neighbour the total
variation to the target reaches ``2·delta``, and more with more drafts.

So we relax the *target*, not the test. Given the target ``p`` and the draft distribution ``q`` of one position
(``[V]`` each), :func:`relaxed_target` moves probability mass along allowed edges ``y → x`` (``y`` among the
neighbours/group of ``x``) from tokens the draft under-proposes (surplus ``p(y) − q(y) > 0``) to tokens it
over-proposes (deficit ``q(x) − p(x) > 0``), at most ``delta`` in total. Exact speculative sampling against the
result ``p*`` then outputs exactly ``p*``, and

    TV(p*, p) = moved mass <= delta      (per position, given the prefix).

Each unit moved raises the acceptance probability ``sum_x min(p*(x), q(x))`` by one unit. With a one-hot ``q``
(deterministic drafts) the deficit is all at the draft, and ``p*(x) = p(x) + (mass taken from x's neighbours)``:
LANTERN's ``A_{k,delta}(x)``. Over a sequence of ``L`` positions the joint total variation is at most ``L·delta``
(telescoping over positions); the tests measure both the per-position and the joint distance on toy models.

The flow is computed in one vectorised pass, not by a sequential greedy: each receiver asks every allowed supplier
for ``min(deficit, surplus)``; requests are scaled down to the receiver's deficit, then to each supplier's surplus,
then to the budget. Scaling down keeps every cap, so the flow is feasible; it may move less than the optimum.
Memory: ``[B, T, V, K]`` for ``K`` edges per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


def relaxed_target(p: Tensor, q: Tensor, suppliers: Tensor, allowed: Tensor | None, delta: float) -> Tensor:
    """``p*`` with ``TV(p*, p) <= delta``, closer to ``q`` along the allowed edges.

    Args:
        p: ``[..., V]`` target probabilities; q: ``[..., V]`` draft probabilities (rows sum to 1).
        suppliers: ``[..., V, K]`` long (or ``[V, K]``, broadcast): the tokens ``x`` may take mass from.
        allowed: ``[..., V, K]`` bool mask of usable edges (None = all).
        delta: the total-variation budget in ``[0, 1]``.

    Returns:
        ``[..., V]`` probabilities (float32) summing to 1.
    """
    p, q = p.float(), q.float()
    if delta <= 0:
        return p
    shape = p.shape
    suppliers = suppliers.expand(*shape, suppliers.shape[-1])
    deficit = (q - p).clamp(min=0)
    surplus = (p - q).clamp(min=0)
    request = torch.minimum(deficit[..., None], _take(surplus, suppliers))  # [..., V, K]
    if allowed is not None:
        request = torch.where(allowed, request, torch.zeros_like(request))
    per_receiver = request.sum(-1)
    request = request * torch.where(per_receiver > deficit, deficit / per_receiver.clamp(min=1e-30),
                                    torch.ones_like(deficit))[..., None]
    demand = torch.zeros_like(p).scatter_add_(-1, suppliers.flatten(-2), request.flatten(-2))
    scale = torch.where(demand > surplus, surplus / demand.clamp(min=1e-30), torch.ones_like(surplus))
    request = request * _take(scale, suppliers)
    total = request.sum((-1, -2))
    budget = torch.where(total > delta, delta / total.clamp(min=1e-30), torch.ones_like(total))
    request = request * budget[..., None, None]
    inflow = request.sum(-1)
    outflow = torch.zeros_like(p).scatter_add_(-1, suppliers.flatten(-2), request.flatten(-2))
    out = (p + inflow - outflow).clamp(min=0)
    return out / out.sum(-1, keepdim=True)


def _take(values: Tensor, index: Tensor) -> Tensor:
    """``values: [..., V]`` at ``index: [..., V, K]`` → ``[..., V, K]``."""
    flat = values.gather(-1, index.flatten(-2))
    return flat.view(index.shape)


def total_variation(a: Tensor, b: Tensor) -> Tensor:
    """``0.5 · sum |a − b|`` over the last dimension."""
    return 0.5 * (a.double() - b.double()).abs().sum(-1)
