"""Base class of every image tokenizer: images ``[B, 3, H, W]`` in ``[-1, 1]`` ↔ :class:`Tokens`."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.modeling import TokenloomModel
from tokenloom.tokens import Tokens, TokenSpec

RANGE_TOLERANCE = 1e-3


class ImageTokenizer(TokenloomModel):
    """Subclasses set ``downsample_factor`` and implement ``spec``, ``encode``, ``decode`` and ``embed``.

    ``spec`` describes the tokens of an image of the configured ``image_size``.
    """

    downsample_factor: int = 1
    image_size: int | None = None

    @property
    def spec(self) -> TokenSpec:
        raise NotImplementedError

    def encode(self, images: Tensor) -> Tokens:
        """``images: [B, 3, H, W]`` float in ``[-1, 1]`` → tokens."""
        raise NotImplementedError

    def decode(self, tokens: Tokens) -> Tensor:
        """tokens → ``[B, 3, H, W]`` float images (roughly ``[-1, 1]``, not clamped)."""
        raise NotImplementedError

    def embed(self, tokens: Tokens) -> Tensor:
        """tokens → ``[B, L, C]`` vectors a generator can read (e.g. codebook entries)."""
        raise NotImplementedError

    # ---- validation shared by all tokenizers (DESIGN.md §7) ----
    def check_images(self, images: Tensor, name: str = "images") -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"{name} must be a float tensor with values in [-1, 1], got dtype {images.dtype}")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{name} must have shape [B, 3, H, W], got {tuple(images.shape)}")
        f = self.downsample_factor
        h, w = images.shape[-2:]
        if h % f or w % f:
            raise ValueError(f"{name} height and width must be divisible by the downsampling factor {f}, "
                             f"got {h}x{w}")
        if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"{name} must be {self.image_size}x{self.image_size} for this tokenizer, "
                             f"got {h}x{w}")
        lo, hi = float(images.min()), float(images.max())
        if not (torch.isfinite(images).all() and lo >= -1 - RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE):
            raise ValueError(f"{name} values must lie in [-1, 1], got range [{lo:.3f}, {hi:.3f}]")

    def check_tokens(self, tokens: Tokens, name: str = "tokens") -> None:
        if not isinstance(tokens, Tokens):
            raise TypeError(f"{name} must be a tokenloom.Tokens, got {type(tokens).__name__}")
        spec = self.spec
        if tokens.spec != spec:
            # A Sequence prefix of the same tokenizer is fine (FlexTok-style decoding of any prefix).
            same_but_length = tokens.spec.kind == spec.kind and tokens.spec.channels == spec.channels
            if not (same_but_length and type(spec.layout).__name__ == "Sequence"):
                raise ValueError(f"{name}.spec {tokens.spec} does not match this tokenizer's spec {spec}")
        spec.validate(tokens.data, f"{name}.data")
