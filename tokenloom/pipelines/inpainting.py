"""``image-inpainting`` and ``image-outpainting``: keep the tokens of the kept pixels, generate the rest.

Both tasks turn their inputs into an image of the model's size plus a repaint mask, then share one path
(:meth:`EditPipelineMixin._edit`): encode, mark tokens whose whole patch is kept as known
(:func:`~tokenloom.pipelines.images.known_token_mask`), generate the unknown ones
(:class:`~tokenloom.pipelines.editing.EditingPipeline`), decode. Known tokens are returned unchanged
(``output.tokens``), with the token mask (``output.known_mask``).
"""

from __future__ import annotations

import torch

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.pipelines.base import row_generators
from tokenloom.pipelines.conditions import prepare_condition
from tokenloom.pipelines.editing import EditingPipeline, broadcast, documented
from tokenloom.pipelines.images import check_size, image_size, known_token_mask, load_images, load_masks
from tokenloom.pipelines.registry import register_pipeline


class EditPipelineMixin:
    """The shared path of the pixel-mask editing tasks."""

    def _edit(self, images, repaint, prompt, class_labels, negative_prompt, num_images_per_prompt, params, generator,
              decoding, output_type, return_dict):
        """``images: [I, 3, H, W]`` in [-1, 1], ``repaint: [M, H, W]`` bool (True = generate) → pipeline output."""
        n = self.check_count(num_images_per_prompt)
        output_type = self.check_output_type(output_type)
        count, make = prepare_condition(self, prompt=prompt, class_labels=class_labels,
                                        negative_prompt=negative_prompt)
        spec = self.token_generator.spec
        size = image_size(self.image_tokenizer, spec)
        check_size(images, size, "image")
        check_size(repaint, size, "mask_image")
        total = max(len(images), len(repaint), count)
        image_of = broadcast(len(images), "image", total)
        mask_of = broadcast(len(repaint), "mask_image", total)
        cond_name = {"text": "prompt", "class": "class_labels"}.get(self.token_generator.condition_kind, "condition")
        cond_of = broadcast(count, cond_name, total)
        token_known = known_token_mask(repaint, spec)  # [M, L]
        rows = torch.arange(total).repeat_interleave(n)
        gens = row_generators(generator, len(rows), "cpu")
        known = self.encode_images(images)[image_of[rows]]
        known_mask = token_known[mask_of[rows]]
        tokens = self.generate_known(make, cond_of[rows], params, gens, known, known_mask, decoding)
        return self.tokens_to_output(tokens, output_type, return_dict, known_mask=known_mask)


@register_pipeline("image-inpainting")
class InpaintingPipeline(EditPipelineMixin, EditingPipeline):
    """Zero-shot inpainting: ``pipe(image, mask_image, prompt=...)`` regenerates the white part of the mask."""

    task = "image-inpainting"

    @torch.no_grad()
    @documented
    def __call__(
        self,
        image,
        mask_image,
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
        """Regenerate the masked part of image(s), keeping every token whose whole patch is outside the mask.

        Args:
            image: the image(s) to edit, at the model's size: PIL, numpy ``[H, W, 3]`` / ``[B, H, W, 3]`` (uint8 or
                [0, 1] floats), tensor ``[3, H, W]`` / ``[B, 3, H, W]`` in [0, 1], or a list
                (:mod:`tokenloom.pipelines.images`).
            mask_image: what to regenerate, the size of ``image``: white / 1 / True = repaint, black / 0 = keep
                (diffusers' convention); PIL, numpy or tensor ``[H, W]`` / ``[B, H, W]``, or a list. A token is kept
                when every pixel of its patch is kept.
            {common}
        """
        params = self.sampling_params(sampling_params, guidance_scale=guidance_scale,
                                      guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, num_steps=num_steps)
        return self._edit(load_images(image), load_masks(mask_image), prompt, class_labels, negative_prompt,
                          num_images_per_prompt, params, generator, decoding, output_type, return_dict)


def _check_box(value, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise TypeError(f"{name} must be a tuple of ints, got {value!r}")
    return tuple(value)


@register_pipeline("image-outpainting")
class OutpaintingPipeline(EditPipelineMixin, EditingPipeline):
    """Zero-shot outpainting: extend an image beyond its borders (``pipe(small_image, offset=(top, left))``)."""

    task = "image-outpainting"

    @torch.no_grad()
    @documented
    def __call__(
        self,
        image,
        offset: tuple[int, int] | None = None,
        keep_box: tuple[int, int, int, int] | None = None,
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
        """Generate everything around a kept region.

        Args:
            image: image(s) (forms as in ``image-inpainting``). Smaller than the model's size ``H × W``: placed
                on an ``H × W`` canvas at ``offset`` and everything outside it is generated. Exactly ``H × W``: the
                region ``keep_box`` is kept and the rest generated.
            offset: ``(top, left)`` of a smaller image on the canvas (None = centred); the image must fit. The
                canvas is mid-grey elsewhere (what the tokenizer encodes around the image's border tokens).
            keep_box: ``(top, left, height, width)`` of the region to keep in a full-size image (required then;
                refused with a smaller image).
            {common}
        """
        params = self.sampling_params(sampling_params, guidance_scale=guidance_scale,
                                      guidance_schedule=guidance_schedule, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, num_steps=num_steps)
        images = load_images(image)
        h_img, w_img = images.shape[-2:]
        h, w = image_size(self.image_tokenizer, self.token_generator.spec)
        if h_img > h or w_img > w:
            raise ValueError(f"image must be at most {h}x{w} pixels (H x W) for this model, got {h_img}x{w_img}")
        if (h_img, w_img) == (h, w):
            if offset is not None:
                raise ValueError(f"offset places a smaller image on the {h}x{w} canvas; image is already {h}x{w}: "
                                 f"pass keep_box=(top, left, height, width) instead")
            if keep_box is None:
                raise ValueError(f"image is the full {h}x{w}: pass keep_box=(top, left, height, width) to say which "
                                 f"region to keep (or give a smaller image to extend)")
            top, left, bh, bw = _check_box(keep_box, "keep_box")
            if len(keep_box) != 4 or bh < 1 or bw < 1 or top < 0 or left < 0 or top + bh > h or left + bw > w:
                raise ValueError(f"keep_box must be (top, left, height, width) inside the {h}x{w} image with "
                                 f"height, width >= 1, got {keep_box!r}")
            canvas = images
        else:
            if keep_box is not None:
                raise ValueError("keep_box selects a region of a full-size image; with a smaller image the whole "
                                 "image is kept (use offset to place it)")
            top, left = ((h - h_img) // 2, (w - w_img) // 2) if offset is None else _check_box(offset, "offset")
            if len((top, left)) != 2 or top < 0 or left < 0 or top + h_img > h or left + w_img > w:
                raise ValueError(f"offset must be (top, left) placing the {h_img}x{w_img} image inside the {h}x{w} "
                                 f"canvas, got {offset!r}")
            bh, bw = h_img, w_img
            canvas = torch.zeros(len(images), 3, h, w)  # mid-grey (0 in [-1, 1]) where the generator will paint
            canvas[:, :, top:top + h_img, left:left + w_img] = images
        repaint = torch.ones(1, h, w, dtype=torch.bool)
        repaint[:, top:top + bh, left:left + bw] = False
        return self._edit(canvas, repaint, prompt, class_labels, negative_prompt, num_images_per_prompt, params,
                          generator, decoding, output_type, return_dict)


__all__ = ["InpaintingPipeline", "OutpaintingPipeline"]
