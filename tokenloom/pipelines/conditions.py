"""From a pipeline's ``prompt`` / ``class_labels`` / ``negative_prompt`` arguments to the generator's Condition.

One place for every task: what a generator is conditioned on (``token_generator.condition_kind``: ``"text"``,
``"class"`` or ``"none"``) decides which arguments are required and which are refused. Inputs are checked before
anything is computed; :func:`prepare_condition` returns the number of conditions and a function that encodes them
for a selection of output rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tokenloom.conditioning.openclip_text import check_prompts
from tokenloom.generators.condition import Condition

KIND_TASK = {"text": "text-to-image", "class": "class-to-image", "none": "unconditional-image-generation"}


def check_class_labels(class_labels, num_classes: int) -> list[int]:
    """An int or a non-empty list/tensor of ints in ``[0, num_classes)`` → list of ints."""
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


def check_negative_prompts(negative_prompt, count: int) -> list[str] | None:
    """None, one string or one per prompt → None or ``count`` strings."""
    if negative_prompt is None:
        return None
    negatives = check_prompts(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        negatives = negatives * count
    if len(negatives) != count:
        raise ValueError(f"negative_prompt must be one string or one per prompt ({count}), got {len(negatives)}")
    return negatives


def encode_text(pipe, prompts: list[str], negatives: list[str] | None, rows: Tensor) -> Condition:
    """Encode prompts with the pipeline's conditioner and select ``rows`` (indices into ``prompts``)."""
    conditioner = pipe.component("conditioner")
    with torch.no_grad(), pipe.autocast():
        cond = conditioner.encode(prompts).select(rows)
        if negatives is None:
            return cond
        neg = conditioner.encode(negatives).select(rows)
    return Condition(features=cond.features, mask=cond.mask, uncond_features=neg.features, uncond_mask=neg.mask)


def prepare_condition(pipe, prompt=None, class_labels=None, negative_prompt=None
                      ) -> tuple[int, Callable[[Tensor], Condition]]:
    """Check the condition arguments against the generator → ``(count, make)``.

    ``count``: conditions given (prompts or labels; 1 for an unconditional generator). ``make(rows)``: the
    :class:`Condition` of output rows ``rows: [R]`` long (indices into the given conditions).
    """
    generator = pipe.token_generator
    kind = generator.condition_kind
    name = type(generator).__name__
    if kind == "text":
        if class_labels is not None:
            raise ValueError(f"class_labels is for class-conditional generators; this {name} is text-conditioned: "
                             f"pass prompt")
        if prompt is None:
            raise ValueError(f"prompt is required: this {name} is text-conditioned")
        if getattr(pipe, "conditioner", None) is None:
            raise ValueError("this pipeline has no conditioner to encode prompts with (a text-conditioned generator "
                             "needs one)")
        prompts = check_prompts(prompt)
        negatives = check_negative_prompts(negative_prompt, len(prompts))
        return len(prompts), lambda rows: encode_text(pipe, prompts, negatives, rows)
    if prompt is not None or negative_prompt is not None:
        raise ValueError(f"prompt and negative_prompt need a text-conditioned generator; this {name} has "
                         f"condition={kind!r}" + (": pass class_labels" if kind == "class" else ""))
    if kind == "class":
        if class_labels is None:
            raise ValueError(f"class_labels is required: this {name} is class-conditional")
        labels = check_class_labels(class_labels, generator.config.num_classes)
        device = pipe._execution_device
        return len(labels), lambda rows: Condition(labels=torch.tensor(labels, device=device)[rows.to(device)])
    if class_labels is not None:
        raise ValueError(f"class_labels needs a class-conditional generator; this {name} is unconditional")
    return 1, lambda rows: Condition(batch=len(rows))


__all__ = ["KIND_TASK", "check_class_labels", "check_negative_prompts", "encode_text", "prepare_condition"]
