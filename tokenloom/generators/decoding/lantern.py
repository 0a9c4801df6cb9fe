"""LANTERN-style relaxed speculative Jacobi decoding (Jang et al. 2024), training-free, with a stated TV bound.

LANTERN observes *token selection ambiguity*: visual AR models spread low probabilities over many interchangeable
tokens, so exact acceptance rejects good drafts. It accepts a draft on the target's mass on the draft's ``k``
nearest codebook neighbours in latent space, up to a total-variation budget ``delta``.

Here the drafts come from Jacobi iterations (:class:`~.sjd.SJD`, no draft model: training-free) and the relaxation
is :func:`~.relaxed.relaxed_target`: mass moves to a token from its ``k`` nearest codebook neighbours (euclidean
distance between the tokenizer's code embeddings, passed in as ``codebook: [V, D]``), at most ``delta`` per
position. **Bound:** every token is drawn from a distribution within total variation ``delta`` of the model's
conditional given its prefix; the joint over ``L`` tokens is within ``L·delta``. ``delta = 0`` is exact SJD.
**Departure from the paper:** LANTERN's rule credits the draft with its neighbours' mass after seeing the draft,
which does not keep the output within ``delta`` (see :mod:`.relaxed`); we relax the target instead, which does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.generators.decoding.base import validate_int, validate_unit
from tokenloom.generators.decoding.relaxed import relaxed_target
from tokenloom.generators.decoding.sjd import SJD


def codebook_neighbours(codebook: Tensor, k: int) -> Tensor:
    """``[V, k]`` long: each code's ``k`` nearest other codes (euclidean), nearest first."""
    dist = torch.cdist(codebook.double(), codebook.double())
    dist.fill_diagonal_(float("inf"))
    return dist.topk(k, dim=-1, largest=False).indices


class LANTERN(SJD):
    """SJD with LANTERN's latent-neighbourhood relaxation.

    Args:
        codebook: ``[V, D]`` float code embeddings of the tokenizer (e.g. ``tokenizer.quantizer.codebook``).
        k: neighbours per code (``1 <= k < V``).
        delta: total-variation budget per position, in ``[0, 1]``.
        window, init: as :class:`~.sjd.SJD`.
    """

    def __init__(self, codebook: Tensor, k: int = 8, delta: float = 0.1, window: int = 8, init: str = "random"):
        super().__init__(window=window, init=init)
        if not isinstance(codebook, Tensor) or codebook.dim() != 2 or not codebook.is_floating_point():
            raise ValueError(f"codebook must be a float tensor [V, D] of code embeddings, got "
                             f"{getattr(codebook, 'dtype', type(codebook).__name__)} "
                             f"{tuple(getattr(codebook, 'shape', ()))}")
        if not torch.isfinite(codebook).all():
            raise ValueError("codebook must be finite")
        self.k = validate_int("k", k)
        if k >= codebook.shape[0]:
            raise ValueError(f"k must be < the codebook size {codebook.shape[0]}, got {k}")
        self.delta = validate_unit("delta", delta)
        self.neighbours = codebook_neighbours(codebook.detach().cpu(), k)

    def __repr__(self) -> str:
        return (f"LANTERN(k={self.k}, delta={self.delta}, window={self.window}, init={self.init!r}, "
                f"codebook={self.neighbours.shape[0]} codes)")

    def prepare(self, model) -> None:
        v = model.spec.vocab_size
        if self.neighbours.shape[0] != v:
            raise ValueError(f"LANTERN's codebook has {self.neighbours.shape[0]} codes but the generator's vocabulary "
                             f"has {v}")

    def relax(self, p: Tensor, q: Tensor, drafts: Tensor) -> Tensor:
        return relaxed_target(p, q, self.neighbours.to(p.device), None, self.delta)
