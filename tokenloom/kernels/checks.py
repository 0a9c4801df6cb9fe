"""Input checks shared by every sampling backend: run before any compute (DESIGN.md §7)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.config import SamplingParams


def row_values(value, rows: int, device, dtype) -> Tensor:
    """A scalar or ``[B]`` tensor parameter as a ``[B]`` tensor."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((rows,), value, device=device, dtype=dtype)


def check_sample_inputs(logits: Tensor, params: SamplingParams, uncond_logits: Tensor | None, generator) -> None:
    """Raise ValueError/TypeError for anything a sampler cannot honour."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor [B, V], got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape [B, V] with B, V >= 1, got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if uncond_logits is not None and uncond_logits.shape != logits.shape:
        raise ValueError(
            f"uncond_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(uncond_logits.shape)}"
        )
    for name in ("temperature", "top_k", "top_p", "min_p"):
        value = getattr(params, name)
        if isinstance(value, Tensor) and value.shape != (rows,):
            raise ValueError(f"SamplingParams.{name} has {value.numel()} per-row values but logits has {rows} rows")
    top_k = params.top_k
    max_k = int(top_k.max()) if isinstance(top_k, Tensor) else top_k
    if max_k > vocab:
        raise ValueError(f"SamplingParams.top_k must be <= the vocabulary size {vocab}, got {max_k}")
    if isinstance(generator, (list, tuple)) and len(generator) != rows:
        raise ValueError(f"generator must be one torch.Generator or a list of {rows} (one per row), "
                         f"got a list of {len(generator)}")
    for name, t in (("logits", logits), ("uncond_logits", uncond_logits)):
        if t is not None and not torch.isfinite(t).all():
            raise ValueError(f"{name} contain NaN or infinite values; non-finite logits are not sampled")
