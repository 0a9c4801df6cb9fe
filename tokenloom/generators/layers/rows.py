"""Per-image sampling settings → per-token ones, for generators that draw several tokens of an image at once.

Every family samples row ``i`` only with generator ``i`` (docs/architecture.md, "Seeding"). When a step draws ``k``
tokens per image through one head call (masked AR's revealed set, a next-scale scale, RandAR's parallel tokens, a
diffusion block), the head sees ``B·k`` rows: :func:`repeat_rows` repeats each image's per-row ``SamplingParams``
values and its generator ``k`` times, in place, so image ``i``'s tokens still draw from ``generator[i]`` alone, in
order.
"""

from __future__ import annotations

from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.checks import PER_ROW_FIELDS


def repeat_rows(params: SamplingParams, generator, repeat: int) -> tuple[SamplingParams, object]:
    """Params and generators of ``B`` rows → of ``B·repeat`` rows, each row repeated in place (per-row tensors
    ``repeat_interleave``-d, a generator list with each generator repeated, so row ``i``'s draws still come only from
    ``generator[i]``, in order). ``repeat == 1`` returns the inputs unchanged; one generator (or None) passes through.
    """
    if repeat == 1:
        return params, generator
    changes = {name: getattr(params, name).repeat_interleave(repeat) for name in PER_ROW_FIELDS
               if isinstance(getattr(params, name), Tensor)}
    if changes:
        params = params.replace(**changes)
    if isinstance(generator, (list, tuple)):
        generator = [g for g in generator for _ in range(repeat)]
    return params, generator


__all__ = ["repeat_rows"]
