"""Best-of-k sampling: draw ``k`` candidates per image and keep the one a scorer likes best.

DALL·E reranked its samples with CLIP; verifier-guided best-of-N is the simplest form of inference-time scaling.
Here the scorer is a pipeline component (``scorer``, e.g. :class:`tokenloom.scoring.captioner.CaptionScorer`)
with ``score(images, prompts) -> [B]``, and ``num_candidates`` is a pipeline setting (saved in
``model_index.json``, overridable per call).

Seeding keeps the pipeline's promise "same seed, same image": output row ``r``'s generator (from
:func:`~tokenloom.pipelines.base.row_generators`) seeds its ``k`` candidate generators, so an image depends only
on its own seed and ``k``, never on the rest of the batch. With ``k = 1`` nothing changes (no scorer runs, the
row's generator is used as it is).
"""

from __future__ import annotations

import torch

from tokenloom.tokens import Tokens


def check_num_candidates(value, has_scorer: bool) -> int:
    """A positive int; more than 1 needs a scorer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_candidates must be a positive int, got {value!r}")
    if value > 1 and not has_scorer:
        raise ValueError(f"num_candidates={value} needs a scorer to choose among the candidates; this pipeline has "
                         f"none (pass scorer=..., or num_candidates=1)")
    return value


def candidate_generators(gens: list[torch.Generator], k: int) -> list[torch.Generator]:
    """``k`` generators per row generator (row-major: row ``r``'s candidates are ``[r·k, (r+1)·k)``)."""
    if k == 1:
        return gens
    return [torch.Generator(device=g.device).manual_seed(int(torch.randint(0, 2**63 - 1, (1,), generator=g)))
            for g in gens for _ in range(k)]


def best_candidates(pipe, tokens: Tokens, prompts: list[str], k: int) -> Tokens:
    """Each row's best of its ``k`` candidates: ``tokens`` holds ``R·k`` candidates, row-major (see
    :func:`candidate_generators`), drawn for ``prompts`` (``R·k`` strings); returns the ``R`` kept ones."""
    if k == 1:
        return tokens
    tokenizer, scorer = pipe.component("image_tokenizer"), pipe.component("scorer")
    with torch.no_grad(), pipe.autocast():
        images = tokenizer.decode(tokens.to(pipe._execution_device)).clamp(-1, 1)
        scores = scorer.score(images, prompts).float().cpu().view(-1, k)
    return tokens[torch.arange(len(scores)) * k + scores.argmax(dim=1)]


__all__ = ["best_candidates", "candidate_generators", "check_num_candidates"]
