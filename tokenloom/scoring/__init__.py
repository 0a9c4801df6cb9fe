"""Scorers of generated images, e.g. the caption scorer that reranks a text-to-image pipeline's candidates.

Registered scorers (``build(name, **config)``), all ``score(images, prompts) -> [B]`` (higher = a better match):

* ``caption_scorer`` — :class:`tokenloom.scoring.captioner.CaptionScorer`, ``log p(prompt | image)`` under a small
  captioner trained with ``scripts/train_scorer.py``.
"""

from tokenloom.registry import Registry

SCORERS = Registry("tokenloom.scoring", "scorer")
available = SCORERS.available
build = SCORERS.build
register = SCORERS.register

__all__ = ["SCORERS", "available", "build", "register"]
