"""Conditioners: prompts → ``Condition`` for the generators.

Registered text conditioners (``build(name, **config)``), all ``encode(prompts) -> Condition`` with
``feature_dim``/``feature_length`` (contract in :mod:`tokenloom.conditioning.base`):

* ``openclip_text`` — open_clip's text transformer trained from scratch with a compact vocabulary.
* ``openclip_pretrained`` — a pretrained open_clip text tower (architecture by name or config, local weights).
* ``transformers_text`` — a Hugging Face T5 encoder or CLIP text model from a local folder.

:mod:`tokenloom.conditioning.embedding_cache` stores a frozen conditioner's features for training.

Class conditioning has no conditioner here on purpose: the class-embedding table (with the null class for
classifier-free guidance as its last row) is part of each generator (``generators/layers/prefix.py``,
``ClassPrefix``), where converted checkpoints (LlamaGen, VAR, MAR) keep it; a class-to-image pipeline hands
labels straight to the generator (``Condition(labels=...)``).
"""

from tokenloom.registry import Registry

CONDITIONERS = Registry("tokenloom.conditioning", "conditioner")
available = CONDITIONERS.available
build = CONDITIONERS.build
register = CONDITIONERS.register

__all__ = ["available", "build", "register", "CONDITIONERS"]
