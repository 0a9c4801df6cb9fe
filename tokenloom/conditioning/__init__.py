"""Conditioners: text encoders (open_clip, transformers) and class embeddings → ``Condition``."""

from tokenloom.registry import Registry

CONDITIONERS = Registry("tokenloom.conditioning", "conditioner")
available = CONDITIONERS.available
build = CONDITIONERS.build
register = CONDITIONERS.register

__all__ = ["available", "build", "register", "CONDITIONERS"]
