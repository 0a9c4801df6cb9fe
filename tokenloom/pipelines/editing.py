"""What the editing tasks share (``image-inpainting``, ``image-outpainting``, ``image-variation``).

Every editing task is the same operation: encode the input image, mark a set of its tokens as *known*, and let the
generator produce the rest while keeping the known ones exactly. The generator does this through
``generate(..., known=Tokens, known_mask=[B, L])``:

* random-order AR (RandAR): the known positions come first in the order and are teacher-forced;
* masked AR (MAR/MaskGIT): generation starts from a partial mask (known positions visible);
* next-scale (VAR): at every scale the known tokens are teacher-forced in place of the sampled ones.

A generator without that argument (raster AR, block diffusion) cannot edit; building an editing pipeline with
one raises a ``ValueError`` naming the generator and the tasks it supports.

Rows are generated in groups of equal known-token count (masked AR needs it; random-order AR would otherwise
schedule a row by its batch-mates' counts), each with its own ``torch.Generator``, so a row's image depends only on
its image, mask, condition and seed.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.pipelines.base import TokenPipeline
from tokenloom.pipelines.conditions import KIND_TASK
from tokenloom.tokens import Tokens

EDITING_TASKS = ("image-inpainting", "image-outpainting", "image-variation")


def can_edit(generator) -> bool:
    """True when ``generator.generate`` takes ``known`` and ``known_mask`` (keeps given tokens)."""
    params = inspect.signature(type(generator).generate).parameters
    return "known" in params and "known_mask" in params


def editing_generators() -> list[str]:
    """Class names of the registered generators that can edit."""
    from tokenloom.generators import GENERATORS

    names = []
    for name in GENERATORS.available():
        cls = GENERATORS.get(name)
        params = inspect.signature(cls.generate).parameters
        if "known" in params and "known_mask" in params:
            names.append(cls.__name__)
    return sorted(names)


def supported_tasks(generator) -> list[str]:
    """The pipeline tasks a generator can serve."""
    kind = getattr(generator, "condition_kind", None)
    tasks = [KIND_TASK[kind]] if kind in KIND_TASK else []
    tasks.append("image-reconstruction")
    if can_edit(generator):
        tasks += list(EDITING_TASKS)
    return tasks


def check_can_edit(generator, task: str) -> None:
    if generator is not None and not can_edit(generator):
        raise ValueError(f"{type(generator).__name__} cannot do {task!r}: it cannot keep known tokens while "
                         f"generating the rest. It supports {supported_tasks(generator)}; generators that can edit: "
                         f"{editing_generators()}")


def broadcast(count: int, name: str, total: int) -> Tensor:
    """Indices ``[total]`` into ``count`` given items: one item is shared, else one per row."""
    if count not in (1, total):
        raise ValueError(f"{name} must hold 1 or {total} entries (the batch size), got {count}")
    return torch.zeros(total, dtype=torch.long) if count == 1 else torch.arange(total)


COMMON_ARGS = """prompt: text-conditioned generators: a string or a list (one per image, or one for all images).
            class_labels: class-conditional generators: an int or a list of ints (one per image, or one for all).
            negative_prompt: text-conditioned generators: string(s) replacing the null condition in guidance.
            num_images_per_prompt: outputs per input (each with its own seed).
            guidance_scale: classifier-free guidance (1.0 = off); None keeps the folder's default.
            guidance_schedule: how guidance varies over the steps (:class:`GuidanceSchedule`).
            temperature, top_k, top_p, min_p: truncation and temperature (see :class:`SamplingParams`).
            num_steps: decoding steps (random-order and masked AR: steps over the unknown tokens, capped at their
                number; next-scale: ignored, one step per scale).
            sampling_params: a full :class:`SamplingParams` replacing the folder's defaults.
            generator: a ``torch.Generator`` or one per output image; the same seed gives the same image, whatever
                else is in the batch.
            decoding: must be None for the editing generators.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"tokens"``.
            return_dict: return a :class:`TokenPipelineOutput` (``images``, ``tokens``, ``known_mask`` ``[B, L]``
                bool = the kept tokens), else a tuple ``(images, tokens)``."""


def documented(fn):
    """Fill ``{common}`` in ``fn``'s docstring with the arguments every editing task shares."""
    fn.__doc__ = fn.__doc__.replace("{common}", COMMON_ARGS)
    return fn


class EditingPipeline(TokenPipeline):
    """Base of the editing tasks: ``image_tokenizer``, an editing ``token_generator`` and an optional conditioner."""

    _optional_components = ["conditioner"]

    def __init__(self, image_tokenizer, token_generator, conditioner=None, sampling_defaults: dict | None = None,
                 card: dict | None = None):
        super().__init__()
        check_can_edit(token_generator, self.task)
        self._register(image_tokenizer, token_generator, conditioner, sampling_defaults, card)

    def generate_known(self, make_cond, rows: Tensor, params: SamplingParams, gens: list, known: Tokens,
                       known_mask: Tensor, decoding=None) -> Tokens:
        """Generate ``len(rows)`` rows keeping ``known`` where ``known_mask`` (``[R, L]`` bool) is True.

        ``make_cond(rows)`` gives the condition of those rows; rows are grouped by their known count.
        """
        counts = known_mask.sum(1)
        out = torch.empty_like(known.data)
        for count in counts.unique().tolist():
            idx = (counts == count).nonzero()[:, 0]
            part = self.run_generator(make_cond(rows[idx]), params, [gens[i] for i in idx.tolist()], decoding,
                                      known=known[idx].to(self._execution_device),
                                      known_mask=known_mask[idx].to(self._execution_device))
            out[idx] = part.data.to(out)
        return Tokens(out, known.spec)


__all__ = ["COMMON_ARGS", "EDITING_TASKS", "EditingPipeline", "broadcast", "can_edit", "check_can_edit", "documented",
           "editing_generators", "supported_tasks"]
