"""``image-variation``: re-sample a fraction of an image's tokens, keep the rest.

``strength`` is the fraction of token positions re-sampled: ``round(strength · L)`` positions chosen uniformly at
random per output image (drawn from that image's own ``torch.Generator``), the others kept exactly. ``strength=0``
returns the image's own tokens, ``1`` samples a new image (with the same condition). On a next-scale (VAR) model the
positions are drawn over all scales; kept fine tokens then sit on re-sampled coarser ones (VAR's residual sum).
"""

from __future__ import annotations

import torch

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.pipelines.base import row_generators
from tokenloom.pipelines.conditions import prepare_condition
from tokenloom.pipelines.editing import EditingPipeline, broadcast, documented
from tokenloom.pipelines.images import check_size, image_size, load_images
from tokenloom.pipelines.registry import register_pipeline


@register_pipeline("image-variation")
class ImageVariationPipeline(EditingPipeline):
    """Variations of an image: ``pipe(image, strength=0.3, class_labels=3)``."""

    task = "image-variation"

    @torch.no_grad()
    @documented
    def __call__(
        self,
        image,
        strength: float = 0.5,
        prompt=None,
        class_labels=None,
        negative_prompt=None,
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
        """Re-sample a random fraction of each image's tokens.

        Args:
            image: image(s) at the model's size (forms as in ``image-inpainting``).
            strength: fraction in ``[0, 1]`` of token positions re-sampled (``round(strength · L)`` per image, drawn
                from the image's own generator).
            {common}
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be a number in [0, 1] (the fraction of tokens re-sampled), got "
                             f"{strength!r}")
        n = self.check_count(num_images_per_prompt)
        output_type = self.check_output_type(output_type)
        params = self.sampling_params(sampling_params, guidance_scale=guidance_scale,
                                      guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, num_steps=num_steps)
        count, make = prepare_condition(self, prompt=prompt, class_labels=class_labels,
                                        negative_prompt=negative_prompt)
        images = load_images(image)
        spec = self.token_generator.spec
        check_size(images, image_size(self.image_tokenizer, spec), "image")
        total = max(len(images), count)
        image_of = broadcast(len(images), "image", total)
        cond_name = {"text": "prompt", "class": "class_labels"}.get(self.token_generator.condition_kind, "condition")
        cond_of = broadcast(count, cond_name, total)
        rows = torch.arange(total).repeat_interleave(n)
        gens = row_generators(generator, len(rows), "cpu")
        length = spec.length
        resample = round(strength * length)
        known_mask = torch.ones(len(rows), length, dtype=torch.bool)
        for i, g in enumerate(gens):
            known_mask[i, torch.randperm(length, generator=g)[:resample]] = False
        known = self.encode_images(images)[image_of[rows]]
        tokens = self.generate_known(make, cond_of[rows], params, gens, known, known_mask, decoding)
        return self.tokens_to_output(tokens, output_type, return_dict, known_mask=known_mask)


__all__ = ["ImageVariationPipeline"]
