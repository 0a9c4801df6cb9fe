"""Image tokenizers: VQ, RVQ, multi-scale VQ, LFQ/BSQ, FSQ, 1D FlexTok-style, KL-VAE.

``available()`` lists them by name; ``build(name, **config)`` makes one.
"""

from tokenloom.registry import Registry
from tokenloom.tokenizers.base import ImageTokenizer

TOKENIZERS = Registry("tokenloom.tokenizers", "tokenizer")
available = TOKENIZERS.available
build = TOKENIZERS.build
register = TOKENIZERS.register

__all__ = ["ImageTokenizer", "available", "build", "register"]
