"""The non-module parts of the masked AR generator (MAR): patches, masking schedules and per-row randomness.

* :func:`patchify` / :func:`unpatchify` — MAR's latent ↔ token layout (fixtures README §7): a latent
  ``[B, c, h·p, w·p]`` becomes ``h·w`` tokens in row-major order, each ``c·p·p`` values ordered channel, then row
  offset inside the patch, then column offset.
* :func:`mar_mask_lengths` — MAR's (and MaskGIT's) cosine schedule: after step ``s`` of ``N`` the first
  ``mask_len_s = clamp(floor(L·cos(π/2·(s+1)/N)), 1, masked_s − 1)`` positions of the order stay masked; the last
  step reveals everything left. Computed with numpy's ``cos`` in float64, as MAR does.
* :func:`mar_guidance_values` — MAR's ``cfg_schedule="linear"``: ``1 + (cfg − 1)·(L − mask_len_s)/L``.
* :func:`sample_mask_ratio` — MAR's training mask ratio, a normal(1, std) truncated to ``[mask_ratio_min, 1]``
  (``scipy.stats.truncnorm`` in MAR; here the inverse-CDF draw with torch, so a ``torch.Generator`` seeds it).
* :func:`row_rand` — ``[B, n]`` uniforms, row ``i`` drawn from ``generator[i]`` alone when a list is given.
* :func:`repeat_rows` — per-image sampling params and generators → per-token ones (each image's tokens use its
  values and draw from its generator, in order); the one shared by every family, from ``layers/rows.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tokenloom.generators.layers.rows import repeat_rows


def patchify(latent: Tensor, patch_size: int) -> Tensor:
    """``latent: [B, c, h·p, w·p]`` → ``[B, h·w, c·p·p]`` (MAR's ``patchify``)."""
    b, c, hp, wp = latent.shape
    p = patch_size
    if hp % p or wp % p:
        raise ValueError(f"latent height and width must be divisible by patch_size={p}, got {tuple(latent.shape)}")
    x = latent.reshape(b, c, hp // p, p, wp // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (hp // p) * (wp // p), c * p * p)


def unpatchify(x: Tensor, channels: int, h: int, w: int, patch_size: int) -> Tensor:
    """``x: [B, h·w, c·p·p]`` → ``[B, c, h·p, w·p]`` (MAR's ``unpatchify``)."""
    b, p = x.shape[0], patch_size
    if x.shape[1:] != (h * w, channels * p * p):
        raise ValueError(f"patches must have shape [B, {h * w}, {channels * p * p}], got {tuple(x.shape)}")
    x = x.reshape(b, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, h * p, w * p)


def check_num_steps(num_steps, seq_len: int) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= seq_len:
        raise ValueError(f"num_steps (masked AR iterations) must be an int in [1, {seq_len}] (the number of token "
                         f"positions), got {num_steps!r}")
    return num_steps


def mar_mask_lengths(seq_len: int, num_steps: int) -> list[int]:
    """MAR's ``mask_len`` of every step (``[N]`` ints): positions still masked after step ``s < N − 1``.

    At the last step MAR's formula gives 1 (it clamps to at least 1) although every remaining position is then
    revealed; the value is kept because MAR's guidance ramp uses it. With ``N <= L`` every step reveals at least one
    position.
    """
    check_num_steps(num_steps, seq_len)
    masked, out = seq_len, []
    for step in range(num_steps):
        ratio = np.cos(math.pi / 2.0 * (step + 1) / num_steps)
        mask_len = max(1, min(masked - 1, int(np.floor(seq_len * ratio))))
        out.append(mask_len)
        masked = mask_len
    return out


def masked_after_steps(seq_len: int, num_steps: int) -> list[int]:
    """Positions still masked after each step: :func:`mar_mask_lengths` with the last entry 0."""
    lengths = mar_mask_lengths(seq_len, num_steps)
    return lengths[:-1] + [0]


def mar_guidance_values(cfg: float, seq_len: int, num_steps: int) -> list[float]:
    """MAR's linear guidance ramp: step ``s`` uses ``1 + (cfg − 1)·(L − mask_len_s)/L`` (float64)."""
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
        raise ValueError(f"cfg must be a finite number >= 0, got {cfg!r}")
    return [1.0 + (float(cfg) - 1.0) * (seq_len - m) / seq_len for m in mar_mask_lengths(seq_len, num_steps)]


def sample_mask_ratio(mask_ratio_min: float, std: float = 0.25, generator: torch.Generator | None = None) -> float:
    """One draw of normal(1, std) truncated to ``[mask_ratio_min, 1]`` (inverse CDF in float64)."""
    lo = torch.special.ndtr(torch.tensor((mask_ratio_min - 1.0) / std, dtype=torch.float64))
    device = generator.device if generator is not None else "cpu"
    u = torch.rand((), generator=generator, dtype=torch.float64, device=device).cpu()
    ratio = 1.0 + std * float(torch.special.ndtri(lo + u * (0.5 - lo)))
    return min(1.0, max(mask_ratio_min, ratio))


def row_rand(generator, rows: int, n: int, device) -> Tensor:
    """``[rows, n]`` float32 uniforms; a list of ``rows`` generators draws row ``i`` from ``generator[i]`` only."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(n, generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.rand(rows, n, generator=generator, device=gen_device).to(device)


def random_orders(generator, rows: int, seq_len: int, device) -> Tensor:
    """``[rows, L]`` long: one uniformly random permutation of the positions per row (MAR's ``sample_orders``)."""
    return row_rand(generator, rows, seq_len, device).argsort(dim=-1)


def first_of_order(orders: Tensor, count: int) -> Tensor:
    """``[B, L]`` bool: True at the first ``count`` positions of each row's order."""
    mask = torch.zeros(orders.shape, dtype=torch.bool, device=orders.device)
    return mask.scatter_(1, orders[:, :count], True)


__all__ = ["check_num_steps", "first_of_order", "mar_guidance_values", "mar_mask_lengths", "masked_after_steps",
           "patchify", "random_orders", "repeat_rows", "row_rand", "sample_mask_ratio", "unpatchify"]
