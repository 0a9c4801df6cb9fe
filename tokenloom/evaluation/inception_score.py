"""Inception Score from a classifier's logits: ``exp(E_x KL(p(y|x) || p(y)))``, averaged over splits.

The classifier is Inception-v3 when its weights are given locally (1008-way head without bias, as
StyleGAN and torch-fidelity compute it) or a built-in :class:`~tokenloom.evaluation.features.FeatureCNN`
(21 shape×colour classes for shapes, 10 for digits). The score lies in ``[1, K]``: 1 when every
image gets the same prediction (or every prediction is uniform), ``K`` when predictions are
confident and the classes balanced. Like FID, it is comparable only between runs with the same
classifier, which every :class:`ISResult` names.

Written here (a few lines) because clean-fid has no Inception Score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ISResult:
    """Mean and standard deviation over splits, with the classifier and the image count."""

    mean: float
    std: float
    classifier: str
    n: int
    splits: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"IS {self.mean:.4f} ± {self.std:.4f} (classifier {self.classifier}, {self.n} images, "
            f"{self.splits} splits)"
        )


def inception_score(logits_NK, splits: int = 10, classifier: str = "") -> ISResult:
    """Inception Score of class logits ``[N, K]`` (log-probabilities work too: softmax is shift-invariant).

    The ``N`` images are cut into ``splits`` consecutive, nearly equal parts; the score of each
    part uses that part's marginal ``p(y)``; the result is their mean and (population) std.
    """
    logits = torch.as_tensor(
        np.asarray(logits_NK) if not isinstance(logits_NK, torch.Tensor) else logits_NK, dtype=torch.float64
    )
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits of shape {tuple(logits.shape)}: expected [N, K] with K >= 2 classes")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain non-finite values")
    if not isinstance(splits, int) or not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"splits={splits!r} must be an int in [1, N] = [1, {logits.shape[0]}]")
    scores = []
    for part in torch.tensor_split(logits, splits):
        log_p = part.log_softmax(dim=1)  # [n, K]
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(part.shape[0])  # [K]
        kl = (log_p.exp() * (log_p - log_marginal)).sum(dim=1)  # [n]
        scores.append(kl.mean().exp().item())
    return ISResult(
        mean=float(np.mean(scores)),
        std=float(np.std(scores)),
        classifier=classifier,
        n=int(logits.shape[0]),
        splits=splits,
    )
