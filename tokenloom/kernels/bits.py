"""Sampling bitwise tokens (Infinity-style LFQ/BSQ heads): one binary choice per bit.

``sample_bits(bit_logits, params, generator, *, uncond_logits=None, backend=None) -> [B, bits]`` long 0/1.

* ``bit_logits`` is ``[B, bits]`` (the log-odds of bit = 1) or ``[B, bits, 2]`` (a logit per outcome,
  what :meth:`Head.logits` returns for bitwise heads). Row ``b``'s parameters apply to all its bits.
* Each bit is the index sampler's contract (``reference.py``) over a vocabulary of two outcomes
  ``(0, 1)``: guidance and temperature act on the two logits, min-p drops the weaker outcome when its
  weight is ``< min_p``, ``top_k == 1`` keeps only the stronger one (``top_k`` 0 or ``>= 2`` keeps both —
  unlike index tokens, a ``top_k`` above 2 is not an error, so one SamplingParams serves both kinds),
  top-p keeps the weaker one when the stronger one's mass is ``< top_p · Z``; temperature 0 is greedy
  (ties → 0). The draw is the index-order inverse CDF with one uniform per bit.
* Randomness: ``bits`` uniforms per row from :func:`row_uniforms` (row ``i`` from ``generator[i]`` when a
  list is given), so every backend draws the same bits.

Backends: ``"torch"`` (the default on every device) is a closed form over the two outcomes, elementwise
on ``[B, bits]``; ``"reference"`` and ``"triton"`` run the index samplers on ``[B·bits, 2]`` pair logits
— they exist to check the closed form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.checks import check_finite, check_generator, check_params, row_values
from tokenloom.kernels.reference import row_uniforms, sample_reference

BIT_BACKENDS = ("reference", "torch", "triton")


@torch.no_grad()
def sample_bits(
    bit_logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    uncond_logits: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Draw every bit of ``bit_logits: [B, bits]`` (log-odds) or ``[B, bits, 2]`` → ``[B, bits]`` long."""
    if backend is not None and backend not in BIT_BACKENDS:
        raise ValueError(f"backend must be None or one of {BIT_BACKENDS}, got {backend!r}")
    check_bits_inputs(bit_logits, params, uncond_logits, generator)
    rows, bits = bit_logits.shape[:2]
    uniforms = row_uniforms(generator, rows, bit_logits.device, per_row=bits)
    pairs = _pairs(bit_logits)
    uncond_pairs = None if uncond_logits is None else _pairs(uncond_logits)
    if backend in (None, "torch"):
        return _sample_bits_closed_form(pairs, uncond_pairs, params, uniforms)
    flat_params = _repeat_rows(params, rows, bits)
    flat = pairs.reshape(rows * bits, 2)
    flat_u = None if uncond_pairs is None else uncond_pairs.reshape(rows * bits, 2)
    if backend == "reference":
        tokens = sample_reference(flat, flat_params, uniforms.reshape(-1), flat_u)
    else:
        from tokenloom.kernels.triton_sampling import sample_triton

        tokens = sample_triton(flat, flat_params, uniforms.reshape(-1), flat_u)
    return tokens.view(rows, bits)


def check_bits_inputs(bit_logits: Tensor, params: SamplingParams, uncond_logits: Tensor | None,
                      generator) -> None:
    """Raise ValueError/TypeError naming the argument, before any compute."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(bit_logits, Tensor) or not bit_logits.is_floating_point():
        raise TypeError("bit_logits must be a float tensor [B, bits] or [B, bits, 2], got "
                        f"{getattr(bit_logits, 'dtype', type(bit_logits))}")
    shape = tuple(bit_logits.shape)
    if not (len(shape) == 2 or (len(shape) == 3 and shape[2] == 2)) or 0 in shape:
        raise ValueError(f"bit_logits must have shape [B, bits] (log-odds) or [B, bits, 2], got {shape}")
    if uncond_logits is not None and (not isinstance(uncond_logits, Tensor) or uncond_logits.shape != shape):
        raise ValueError(f"uncond_logits must have the shape of bit_logits {shape}, got "
                         f"{tuple(getattr(uncond_logits, 'shape', ()))}")
    check_params(params.replace(top_k=0), shape[0], 2, what="bit_logits")
    top_k = params.top_k
    if isinstance(top_k, Tensor) and top_k.shape != (shape[0],):
        raise ValueError(f"SamplingParams.top_k has {top_k.numel()} per-row values but bit_logits has "
                         f"{shape[0]} rows")
    check_generator(generator, shape[0])
    check_finite("bit_logits", bit_logits)
    if uncond_logits is not None:
        check_finite("uncond_logits", uncond_logits)


def _pairs(bit_logits: Tensor) -> Tensor:
    """``[B, bits, 2]`` float32 outcome logits (log-odds ``l`` become ``(0, l)``)."""
    x = bit_logits.float()
    return x if x.dim() == 3 else torch.stack([torch.zeros_like(x), x], dim=-1)


def _repeat_rows(params: SamplingParams, rows: int, bits: int) -> SamplingParams:
    """Per-row params repeated for each bit of a row (``[B]`` → ``[B·bits]``); top_k clamped to 2."""
    changes = {}
    for name in ("temperature", "top_k", "top_p", "min_p"):
        value = getattr(params, name)
        if isinstance(value, Tensor):
            changes[name] = value.repeat_interleave(bits)
    top_k = changes.get("top_k", params.top_k)
    changes["top_k"] = top_k.clamp(max=2) if isinstance(top_k, Tensor) else min(top_k, 2)
    return params.replace(**changes)


def _sample_bits_closed_form(pairs: Tensor, uncond_pairs: Tensor | None, params: SamplingParams,
                             uniforms: Tensor) -> Tensor:
    """The contract over two outcomes, elementwise: ``pairs [B, bits, 2]``, ``uniforms [B, bits]``."""
    rows, device = pairs.shape[0], pairs.device
    x = pairs
    if uncond_pairs is not None and params.guidance_scale != 1.0:
        x = uncond_pairs + params.guidance_scale * (x - uncond_pairs)
    temperature = row_values(params.temperature, rows, device, torch.float32)[:, None]
    top_k = row_values(params.top_k, rows, device, torch.long)[:, None]
    top_p = row_values(params.top_p, rows, device, torch.float32)[:, None]
    min_p = row_values(params.min_p, rows, device, torch.float32)[:, None]
    greedy = temperature == 0
    z = x / torch.where(greedy, 1.0, temperature)[..., None]
    z0, z1 = z.unbind(-1)
    first_is_top = z0 >= z1  # rank: larger z first, ties → outcome 0
    e0, e1 = torch.exp(z - z.amax(dim=-1, keepdim=True)).unbind(-1)
    e_other = torch.where(first_is_top, e1, e0)
    keep_other = (e_other >= min_p) & (top_k != 1)
    w_other = torch.where(keep_other, e_other, 0.0)
    # top-p in rank order: cum = (1, 1 + w_other) summed in float64 as torch.cumsum does.
    mass = (1.0 + w_other.double()).float()
    keep_other &= (1.0 < top_p * mass) | (top_p >= 1)
    w_other = torch.where(keep_other, e_other, 0.0)
    w0 = torch.where(first_is_top, 1.0, w_other).double()
    w1 = torch.where(first_is_top, w_other, 1.0).double()
    target = uniforms * (w0 + w1)
    bit = torch.where(w0 > target, 0, torch.where(w1 > 0, 1, 0))
    greedy_bit = (x[..., 1] > x[..., 0]).long()
    return torch.where(greedy, greedy_bit, bit)
