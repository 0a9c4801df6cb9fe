"""``unconditional-image-generation``: images from a generator trained without a condition."""

from __future__ import annotations

import torch

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.pipelines.base import TokenPipeline, row_generators
from tokenloom.pipelines.conditions import KIND_TASK, prepare_condition
from tokenloom.pipelines.registry import register_pipeline


@register_pipeline("unconditional-image-generation")
class UnconditionalImagePipeline(TokenPipeline):
    """Unconditional generation: ``pipe(batch_size=4).images`` (as diffusers' ``DDPMPipeline``)."""

    task = "unconditional-image-generation"

    def __init__(self, image_tokenizer, token_generator, conditioner=None, sampling_defaults: dict | None = None,
                 card: dict | None = None):
        super().__init__()
        kind = getattr(token_generator, "condition_kind", "none")
        if kind != "none":
            raise ValueError(f"{type(token_generator).__name__} is conditioned on {kind!r}; "
                             f"unconditional-image-generation needs condition='none' (use the {KIND_TASK[kind]!r} "
                             f"task for this model)")
        self._register(image_tokenizer, token_generator, conditioner, sampling_defaults, card)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
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
        guidance_scale: float | None = None,
        guidance_schedule: GuidanceSchedule | None = None,
    ):
        """Sample ``batch_size`` images.

        Args:
            batch_size: number of images (a positive int).
            temperature, top_k, top_p, min_p: truncation and temperature (see :class:`SamplingParams`).
            num_steps: steps for masked/random-order/diffusion generators.
            sampling_params: a full :class:`SamplingParams` replacing the folder's defaults.
            generator: a ``torch.Generator`` or one per image; the same seed gives the same image.
            decoding: a decoding algorithm for the generator, None = its default.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"tokens"``.
            return_dict: return a :class:`TokenPipelineOutput` (else a tuple ``(images, tokens)``).
            guidance_scale, guidance_schedule: accepted for a uniform call signature; an unconditional model has
                nothing to guide, so any ``guidance_scale`` other than 1.0 is refused.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        output_type = self.check_output_type(output_type)
        _, make = prepare_condition(self)
        params = self.sampling_params(sampling_params, guidance_scale=guidance_scale,
                                      guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, num_steps=num_steps)
        if params.uses_guidance:
            raise ValueError(f"guidance_scale must be 1.0 for an unconditional model, got {params.guidance_scale}")
        gens = row_generators(generator, batch_size, "cpu")
        tokens = self.run_generator(make(torch.zeros(batch_size, dtype=torch.long)), params, gens, decoding)
        return self.tokens_to_output(tokens, output_type, return_dict)


__all__ = ["UnconditionalImagePipeline"]
