"""The non-module parts of the random-order AR generator (RandAR, RAR): orders, schedules, per-token randomness.

* :func:`randar_tokens_per_step` — RandAR's cosine parallel-decoding schedule: step 0 decodes one token; after
  step ``s`` the decoded total aims at ``int((1 − cos(π/2·(s+2)/N))·L + 1)`` (capped at ``L``), every step decodes at
  least one token. With ``N <= L`` it takes exactly ``N`` steps (checked in the tests for every ``N``); ``N = 1``
  decodes all ``L`` tokens at once (RandAR's formula would take two steps).
* :func:`randar_guidance_values` — RandAR's linear guidance ramp ``start + (end − start)·decoded/L`` where
  ``decoded`` counts the tokens decoded *before* the step (for ``GuidanceSchedule.steps``).
* :func:`permute_probability` — RAR's randomness annealing: the probability ``r`` that a training sample uses a
  random order is 1 until ``anneal_start``, falls linearly to 0 at ``anneal_end``, and stays 0 after.
* :func:`training_orders` — per-row orders for a training batch: random with probability ``r``, else raster.
* :func:`generation_orders` — per-row random orders drawn from per-row generators (row ``i`` depends only on
  ``generator[i]``), optionally with known positions moved to the front (inpainting / outpainting).
* :func:`per_token` — sampling params and generators of ``B`` rows repeated for the ``k`` tokens a row decodes in one
  step, so each row's draws still come only from its own generator (``layers/rows.py``'s ``repeat_rows``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenloom.generators.layers.rows import repeat_rows
from tokenloom.kernels import row_uniforms


def randar_tokens_per_step(length: int, num_steps: int) -> list[int]:
    """Tokens decoded at each step of RandAR's cosine schedule (``sum == length``, ``min(num_steps, length)`` steps).

    Args:
        length: tokens to decode (``L``, or the unknown tokens when some are given).
        num_steps: RandAR's ``num_inference_steps``; must lie in ``[1, length]``.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= length:
        raise ValueError(f"num_steps must be an int in [1, {length}] (at most one step per token), got {num_steps!r}")
    if num_steps == length:
        return [1] * length
    if num_steps == 1:  # RandAR's first step always decodes one token; one step can only mean "all at once"
        return [length]
    counts, done, step = [1], 1, 1
    while done < length:
        target = min(int((1.0 - math.cos(math.pi / 2.0 * (step + 1) / num_steps)) * length + 1), length)
        k = min(max(target - done, 1), length - done)
        counts.append(k)
        done += k
        step += 1
    return counts


def randar_guidance_values(start: float, end: float, tokens_per_step: list[int], length: int) -> list[float]:
    """RandAR's ``cfg_scales=(start, end)``: step ``s`` uses ``start + (end − start)·decoded_s / length``."""
    values, done = [], 0
    for k in tokens_per_step:
        values.append(float(start) + (float(end) - float(start)) * done / length)
        done += k
    return values


def permute_probability(step: int, anneal_start: int | None, anneal_end: int | None) -> float:
    """RAR's ``r``: 1.0 before ``anneal_start``, linear to 0.0 at ``anneal_end``, 0.0 after; always 1.0 when unset."""
    if anneal_start is None:
        return 1.0
    if step < anneal_start:
        return 1.0
    if step >= anneal_end:
        return 0.0
    return 1.0 - (step - anneal_start) / (anneal_end - anneal_start)


def training_orders(batch: int, length: int, permute_prob: float, device=None) -> Tensor:
    """``[B, L]`` long: each row a uniformly random permutation with probability ``permute_prob``, else raster.

    Uses torch's global RNG (seeded by the trainer), as RAR's ``sample_orders`` uses Python's.
    """
    raster = torch.arange(length, device=device).expand(batch, length)
    if permute_prob <= 0.0:
        return raster.clone()
    random = torch.rand(batch, length, device=device).argsort(dim=-1)
    if permute_prob >= 1.0:
        return random
    use_random = torch.rand(batch, device=device) < permute_prob
    return torch.where(use_random[:, None], random, raster)


def generation_orders(generator, batch: int, length: int, device, random: bool = True,
                      known_mask: Tensor | None = None) -> Tensor:
    """``[B, L]`` long orders for generation.

    Args:
        generator: None, one ``torch.Generator`` or a list of ``B`` (row ``i``'s order from ``generator[i]`` only).
        random: a random permutation per row (RandAR) or raster order (RAR at inference).
        known_mask: ``[B, L]`` bool, True = known; known positions move to the front of each row's order, keeping
            their relative order (so known and unknown positions are each in random, or raster, order).
    """
    if random:
        orders = row_uniforms(generator, batch, device, per_row=length).argsort(dim=-1)
    else:
        orders = torch.arange(length, device=device).expand(batch, length).clone()
    return orders if known_mask is None else known_first(orders, known_mask)


def known_first(orders: Tensor, known_mask: Tensor) -> Tensor:
    """``orders: [B, L]`` with each row's known positions (``known_mask: [B, L]`` bool) moved to the front, the known
    and the unknown positions each keeping their relative order."""
    unknown_in_order = (~known_mask.to(orders.device)).gather(1, orders).long()
    return orders.gather(1, unknown_in_order.argsort(dim=-1, stable=True))


per_token = repeat_rows  # B rows → B·k rows for the k tokens a row decodes in one step


def interleave(a: Tensor, b: Tensor) -> Tensor:
    """``[a_0, b_0, a_1, b_1, ...]`` along dim 1 for ``a, b: [B, T, ...]`` → ``[B, 2T, ...]``."""
    return torch.stack([a, b], dim=2).flatten(1, 2)


__all__ = ["generation_orders", "interleave", "known_first", "per_token", "permute_probability",
           "randar_guidance_values", "randar_tokens_per_step", "training_orders"]
