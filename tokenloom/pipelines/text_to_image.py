"""``text-to-image``: prompts → images through a text conditioner and a token generator."""

from __future__ import annotations

import torch

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.pipelines.base import TokenPipeline, row_generators
from tokenloom.pipelines.conditions import prepare_condition
from tokenloom.pipelines.registry import register_pipeline


@register_pipeline("text-to-image")
class TextToImagePipeline(TokenPipeline):
    """Text-conditional generation: ``pipe("a red circle above a blue square").images[0]``."""

    task = "text-to-image"
    _optional_components = []

    def __init__(self, image_tokenizer, token_generator, conditioner, sampling_defaults: dict | None = None,
                 card: dict | None = None):
        super().__init__()
        self._register(image_tokenizer, token_generator, conditioner, sampling_defaults, card)

    @torch.no_grad()
    def __call__(
        self,
        prompt,
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
        """Generate images for prompts.

        Args:
            prompt: a string or a non-empty list of strings.
            negative_prompt: string(s) whose features replace the null condition in guidance (one, or one
                per prompt); None uses the model's learned null condition.
            num_images_per_prompt: images per prompt.
            guidance_scale: classifier-free guidance (1.0 = off); None keeps the folder's default.
            guidance_schedule: how guidance varies over the steps (:class:`GuidanceSchedule`).
            temperature, top_k, top_p, min_p: truncation and temperature (see :class:`SamplingParams`).
            num_steps: steps for masked/diffusion generators.
            sampling_params: a full :class:`SamplingParams` replacing the folder's defaults.
            generator: a ``torch.Generator`` or one per image; the same seed gives the same image, whatever
                else is in the batch.
            decoding: a decoding algorithm for the generator (e.g. speculative Jacobi), None = its default.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"tokens"``.
            return_dict: return a :class:`TokenPipelineOutput` (else a tuple ``(images, tokens)``).
        """
        from tokenloom.conditioning.openclip_text import check_prompts

        check_prompts(prompt)  # a type/emptiness error names ``prompt`` before anything else
        n = self.check_count(num_images_per_prompt)
        output_type = self.check_output_type(output_type)
        count, make = prepare_condition(self, prompt=prompt, negative_prompt=negative_prompt)
        params = self.sampling_params(sampling_params, guidance_scale=guidance_scale,
                                      guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, num_steps=num_steps)
        rows = torch.arange(count).repeat_interleave(n)
        gens = row_generators(generator, len(rows), "cpu")
        tokens = self.run_generator(make(rows), params, gens, decoding)
        return self.tokens_to_output(tokens, output_type, return_dict)
