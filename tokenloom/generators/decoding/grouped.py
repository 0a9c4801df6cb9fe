"""Grouped speculative decoding (GSD; So et al. 2025), training-free, with a stated TV bound.

GSD: image tokens are redundant and diverse, so a draft should be judged against a *group* of visually valid
tokens, not against itself alone; the groups are formed dynamically per position, because static clusters by
embedding distance did not work. GSD's code forms the group of a draft ``x`` from the tokens next to ``x`` in the
target's probability ranking (7 ranks either side) whose target probability is within 0.15 of ``p(x)`` (plus an
embedding-similarity filter), and accepts with ``min(1, p(G) / q(G))``.

Here: the group of ``x`` at each position is the tokens within ``radius`` ranks of ``x`` in that position's target
ranking with ``|p(y) − p(x)| <= tolerance`` (optionally also cosine similarity ``>= min_similarity`` between code
embeddings, when ``codebook`` is given). **What it relaxes:** mass of ``x``'s group counts towards accepting ``x`` —
the target is replaced by ``p*`` (:func:`~.relaxed.relaxed_target`) where up to ``delta`` of mass moved from group
members to over-proposed drafts. **Bound:** each token's distribution given its prefix is within total variation
``delta`` of the model's; the joint over ``L`` tokens within ``L·delta``. ``delta = 0`` is exact SJD.
**Departure from GSD:** its ratio test uses a group chosen after seeing the draft and has no budget; ours moves
budgeted mass in the target, which keeps the bound (see :mod:`.relaxed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tokenloom.generators.decoding.base import validate_int, validate_unit
from tokenloom.generators.decoding.relaxed import relaxed_target
from tokenloom.generators.decoding.sjd import SJD


def rank_groups(p: Tensor, radius: int, tolerance: float) -> tuple[Tensor, Tensor]:
    """Dynamic groups of ``p: [..., V]``: ``(members [..., V, 2·radius] long, allowed [..., V, 2·radius] bool)``.

    Token ``x``'s members are the tokens ranked ``1..radius`` places above and below ``x`` by ``p``, allowed when
    they exist and ``|p(y) − p(x)| <= tolerance``.
    """
    v = p.shape[-1]
    order = p.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(v, device=p.device).expand_as(order).contiguous())
    offsets = torch.cat([torch.arange(-radius, 0), torch.arange(1, radius + 1)]).to(p.device)
    at = rank[..., None] + offsets  # [..., V, 2r]
    inside = (at >= 0) & (at < v)
    members = order.gather(-1, at.clamp(0, v - 1).flatten(-2)).view(at.shape)
    close = (p.gather(-1, members.flatten(-2)).view(at.shape) - p[..., None]).abs() <= tolerance
    return members, inside & close


class GroupedSD(SJD):
    """SJD with GSD's dynamic-group relaxation.

    Args:
        delta: total-variation budget per position, in ``[0, 1]``.
        radius: ranks either side of a token that may join its group (GSD: 7).
        tolerance: largest ``|p(y) − p(x)|`` within a group (GSD: 0.15), in ``[0, 1]``.
        codebook: optional ``[V, D]`` code embeddings; with ``min_similarity`` (in ``[-1, 1]``) group members must
            also be that cosine-similar to ``x``.
        window, init: as :class:`~.sjd.SJD`.
    """

    def __init__(self, delta: float = 0.1, radius: int = 7, tolerance: float = 0.15, codebook: Tensor | None = None,
                 min_similarity: float = -1.0, window: int = 8, init: str = "random"):
        super().__init__(window=window, init=init)
        self.delta = validate_unit("delta", delta)
        self.radius = validate_int("radius", radius)
        self.tolerance = validate_unit("tolerance", tolerance)
        if not -1.0 <= float(min_similarity) <= 1.0:
            raise ValueError(f"min_similarity must lie in [-1, 1], got {min_similarity!r}")
        self.min_similarity = float(min_similarity)
        self.similarity = None
        if codebook is not None:
            if not isinstance(codebook, Tensor) or codebook.dim() != 2 or not codebook.is_floating_point():
                raise ValueError(f"codebook must be None or a float tensor [V, D], got "
                                 f"{tuple(getattr(codebook, 'shape', ()))}")
            unit = F.normalize(codebook.detach().float().cpu(), dim=-1)
            self.similarity = unit @ unit.T  # [V, V]

    def __repr__(self) -> str:
        return (f"GroupedSD(delta={self.delta}, radius={self.radius}, tolerance={self.tolerance}, "
                f"window={self.window}, init={self.init!r})")

    def prepare(self, model) -> None:
        v = model.spec.vocab_size
        if self.similarity is not None and self.similarity.shape[0] != v:
            raise ValueError(f"GroupedSD's codebook has {self.similarity.shape[0]} codes but the generator's "
                             f"vocabulary has {v}")
        if 2 * self.radius >= v:
            raise ValueError(f"radius must be < V/2 = {v / 2} for vocabulary {v}, got {self.radius}")

    def relax(self, p: Tensor, q: Tensor, drafts: Tensor) -> Tensor:
        members, allowed = rank_groups(p, self.radius, self.tolerance)
        if self.similarity is not None:
            sim = self.similarity.to(p.device)
            near = sim[torch.arange(p.shape[-1], device=p.device)[:, None], members]  # [..., V, 2r]
            allowed = allowed & (near >= self.min_similarity)
        return relaxed_target(p, q, members, allowed, self.delta)
