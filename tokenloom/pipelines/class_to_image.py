"""``class-to-image``: class labels → images through a class-conditional token generator."""

from __future__ import annotations

import torch

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.pipelines.base import TokenPipeline, row_generators
from tokenloom.pipelines.registry import register_pipeline


def check_class_labels(class_labels, num_classes: int) -> list[int]:
    labels = [class_labels] if isinstance(class_labels, int) and not isinstance(class_labels, bool) \
        else class_labels
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    if not isinstance(labels, (list, tuple)) or not labels \
            or any(isinstance(x, bool) or not isinstance(x, int) for x in labels):
        raise TypeError(f"class_labels must be an int or a non-empty list of ints, got {class_labels!r}")
    bad = [x for x in labels if not 0 <= x < num_classes]
    if bad:
        raise ValueError(f"class_labels must lie in [0, {num_classes - 1}], got {bad[0]}")
    return list(labels)


@register_pipeline("class-to-image")
class ClassToImagePipeline(TokenPipeline):
    """Class-conditional generation (LlamaGen c2i, VAR, MAR style models)."""

    task = "class-to-image"

    def __init__(self, image_tokenizer, token_generator, conditioner=None, sampling_defaults: dict | None = None):
        super().__init__()
        self._register(image_tokenizer, token_generator, conditioner, sampling_defaults)

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
        labels = check_class_labels(class_labels, self.token_generator.config.num_classes)
        params = self.sampling_params(sampling_params, guidance_scale=guidance_scale,
                                      guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, num_steps=num_steps)
        labels_t = torch.tensor(labels, device=self.device).repeat_interleave(n)
        gens = row_generators(generator, len(labels_t), "cpu")
        tokens = self.token_generator.generate(Condition(labels=labels_t), params, generator=gens,
                                               decoding=decoding, progress=self.show_progress)
        return self.tokens_to_output(tokens, output_type, return_dict)
