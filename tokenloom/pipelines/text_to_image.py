"""``text-to-image``: prompts → images through a text conditioner and a token generator."""

from __future__ import annotations

import torch

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.pipelines.base import TokenPipeline, row_generators
from tokenloom.pipelines.conditions import prepare_condition
from tokenloom.pipelines.registry import register_pipeline
from tokenloom.pipelines.rerank import best_candidates, candidate_generators, check_num_candidates


@register_pipeline("text-to-image")
class TextToImagePipeline(TokenPipeline):
    """Text-conditional generation: ``pipe("a red circle above a blue square").images[0]``."""

    task = "text-to-image"
    _optional_components = ["scorer"]
    model_cpu_offload_seq = "conditioner->token_generator->image_tokenizer->scorer"

    def __init__(self, image_tokenizer, token_generator, conditioner, scorer=None,
                 sampling_defaults: dict | None = None, card: dict | None = None, num_candidates: int = 1):
        """``scorer``: optional image–text scorer (``score(images, prompts) -> [B]``) that picks the best of
        ``num_candidates`` samples per image (see :mod:`tokenloom.pipelines.rerank`)."""
        super().__init__()
        self._register(image_tokenizer, token_generator, conditioner, sampling_defaults, card)
        self.register_modules(scorer=scorer)
        self.register_to_config(num_candidates=check_num_candidates(num_candidates, scorer is not None))

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
        num_candidates: int | None = None,
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
            num_candidates: samples drawn per image, of which the pipeline's ``scorer`` keeps the best (1 = plain
                sampling); None keeps the folder's setting. Costs ``num_candidates`` times the sampling time.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"tokens"``.
            return_dict: return a :class:`TokenPipelineOutput` (else a tuple ``(images, tokens)``).
        """
        from tokenloom.conditioning.openclip_text import check_prompts

        prompts = check_prompts(prompt)  # a type/emptiness error names ``prompt`` before anything else
        n = self.check_count(num_images_per_prompt)
        output_type = self.check_output_type(output_type)
        k = check_num_candidates(self.config.num_candidates if num_candidates is None else num_candidates,
                                 self.scorer is not None)
        count, make = prepare_condition(self, prompt=prompt, negative_prompt=negative_prompt)
        params = self.sampling_params(sampling_params, guidance_scale=guidance_scale,
                                      guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, num_steps=num_steps)
        rows = torch.arange(count).repeat_interleave(n)
        gens = candidate_generators(row_generators(generator, len(rows), "cpu"), k)
        rows = rows.repeat_interleave(k)
        tokens = self.run_generator(make(rows), params, gens, decoding)
        tokens = best_candidates(self, tokens, [prompts[r] for r in rows.tolist()], k)
        return self.tokens_to_output(tokens, output_type, return_dict)
