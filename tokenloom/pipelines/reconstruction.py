"""``image-reconstruction``: image → tokens → image through the image tokenizer alone.

The folder needs only ``image_tokenizer``; a generator (and conditioner) may ride along, e.g. when the folder is
shared with a generation task, but is not used.
"""

from __future__ import annotations

import torch

from tokenloom.pipelines.base import TokenPipeline
from tokenloom.pipelines.images import check_size, load_images
from tokenloom.pipelines.registry import register_pipeline


@register_pipeline("image-reconstruction")
class ImageReconstructionPipeline(TokenPipeline):
    """Tokenize and detokenize: ``out = pipe(image)``; ``out.tokens`` are the codes, ``out.images`` the decoding."""

    task = "image-reconstruction"
    _optional_components = ["token_generator", "conditioner"]

    def __init__(self, image_tokenizer, token_generator=None, conditioner=None, sampling_defaults: dict | None = None,
                 card: dict | None = None):
        super().__init__()
        self._register(image_tokenizer, token_generator, conditioner, sampling_defaults, card)

    @torch.no_grad()
    def __call__(self, image, output_type: str = "pil", return_dict: bool = True):
        """Encode image(s) to tokens and decode them back.

        Args:
            image: image(s): PIL, numpy ``[H, W, 3]`` / ``[B, H, W, 3]`` (uint8 or [0, 1] floats), tensor
                ``[3, H, W]`` / ``[B, 3, H, W]`` in [0, 1], or a list (:mod:`tokenloom.pipelines.images`); a tokenizer
                with a fixed ``image_size`` takes only that size.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"tokens"`` (no decoding).
            return_dict: return a :class:`TokenPipelineOutput` (``images``, ``tokens``), else ``(images, tokens)``.
        """
        output_type = self.check_output_type(output_type)
        images = load_images(image)
        size = getattr(self.image_tokenizer, "image_size", None)
        if isinstance(size, int):
            check_size(images, (size, size), "image")
        tokens = self.encode_images(images)
        return self.tokens_to_output(tokens, output_type, return_dict)


__all__ = ["ImageReconstructionPipeline"]
