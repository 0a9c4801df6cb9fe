"""``class-to-image``: class labels → images through a class-conditional token generator."""

from __future__ import annotations

import torch

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.pipelines.base import TokenPipeline, row_generators
from tokenloom.pipelines.conditions import check_class_labels, prepare_condition
from tokenloom.pipelines.registry import register_pipeline

__all__ = ["ClassToImagePipeline", "check_class_labels"]


@register_pipeline("class-to-image")
class ClassToImagePipeline(TokenPipeline):
    """Class-conditional generation (LlamaGen c2i, VAR, MAR style models)."""

    task = "class-to-image"

    def __init__(self, image_tokenizer, token_generator, conditioner=None, sampling_defaults: dict | None = None,
                 card: dict | None = None):
        super().__init__()
        self._register(image_tokenizer, token_generator, conditioner, sampling_defaults, card)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        guidance_schedule: GuidanceSchedule | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        num_steps: int | None = None,
        sampling_params: SamplingParams | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decoding=None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Generate images of the given classes.

        Args:
            class_labels: an int or a list of ints in ``[0, num_classes)``.
            num_images_per_prompt: images per label.
            guidance_scale: classifier-free guidance (1.0 = off); None keeps the folder's default.
            guidance_schedule: how guidance varies over the steps (:class:`GuidanceSchedule`).
            temperature, top_k, top_p, min_p: truncation and temperature (see :class:`SamplingParams`).
            num_steps: steps for masked/diffusion generators.
            sampling_params: a full :class:`SamplingParams` replacing the folder's defaults.
            generator: a ``torch.Generator`` or one per image; the same seed gives the same image.
            decoding: a decoding algorithm for the generator (e.g. speculative Jacobi), None = its default.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"tokens"``.
            return_dict: return a :class:`TokenPipelineOutput` (else a tuple ``(images, tokens)``).
        """
        n = self.check_count(num_images_per_prompt)
        output_type = self.check_output_type(output_type)
        if class_labels is None:
            raise TypeError("class_labels must be an int or a non-empty list of ints, got None")
        count, make = prepare_condition(self, class_labels=class_labels)
        params = self.sampling_params(sampling_params, guidance_scale=guidance_scale,
                                      guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, num_steps=num_steps)
        rows = torch.arange(count).repeat_interleave(n)
        gens = row_generators(generator, len(rows), "cpu")
        tokens = self.run_generator(make(rows), params, gens, decoding)
        return self.tokens_to_output(tokens, output_type, return_dict)
