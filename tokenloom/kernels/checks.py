"""Input checks shared by every sampling backend: run before any compute (DESIGN.md §7)."""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.config import SamplingParams

PER_ROW_FIELDS = ("temperature", "top_k", "top_p", "min_p")


def row_values(value, rows: int, device, dtype) -> Tensor:
    """A scalar or ``[B]`` tensor parameter as a ``[B]`` tensor."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.full((rows,), value, device=device, dtype=dtype)


def check_finite(name: str, t: Tensor) -> None:
    """Raise if ``t`` holds NaN or ±inf. One float32 sum (a NaN/inf poisons it); exact check if it overflows."""
    total = torch.sum(t, dtype=torch.float32)
    if torch.isfinite(total) or torch.isfinite(t).all():
        return
    bad = (~torch.isfinite(t)).nonzero()[0].tolist()
    raise ValueError(f"{name} contain NaN or infinite values (first at index {bad}: {t[tuple(bad)].item()}); "
                     "non-finite logits are not sampled")


def check_generator(generator, rows: int) -> None:
    """None, one ``torch.Generator`` or a list of ``rows`` of them."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (list, tuple)):
        if len(generator) != rows:
            raise ValueError(f"generator must be one torch.Generator or a list of {rows} (one per row), "
                             f"got a list of {len(generator)}")
        if all(isinstance(g, torch.Generator) for g in generator):
            return
    raise TypeError(f"generator must be None, a torch.Generator or a list of them, got {type(generator).__name__}")


def check_params(params: SamplingParams, rows: int, vocab: int, what: str = "logits") -> None:
    """Per-row params match ``rows``; ``top_k`` fits ``vocab``."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    for name in PER_ROW_FIELDS:
        value = getattr(params, name)
        if isinstance(value, Tensor) and value.shape != (rows,):
            raise ValueError(f"SamplingParams.{name} has {value.numel()} per-row values but {what} has {rows} "
                             "rows")
    top_k = params.top_k
    max_k = int(top_k.max()) if isinstance(top_k, Tensor) else top_k
    if max_k > vocab:
        raise ValueError(f"SamplingParams.top_k must be <= the vocabulary size {vocab}, got {max_k}")


def check_sample_inputs(logits: Tensor, params: SamplingParams, uncond_logits: Tensor | None, generator,
                        finite: bool = True) -> None:
    """Raise ValueError/TypeError for anything a sampler cannot honour.

    ``finite=False`` skips the finiteness sums, for a backend that checks the values as it reads them
    (``numba_sampling``) and then calls :func:`check_finite` for the message.
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a float tensor [B, V], got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape [B, V] with B, V >= 1, got {tuple(logits.shape)}")
    rows, vocab = logits.shape
    if uncond_logits is not None:
        if not isinstance(uncond_logits, Tensor) or not uncond_logits.is_floating_point():
            raise TypeError("uncond_logits must be None or a float tensor [B, V], got "
                            f"{getattr(uncond_logits, 'dtype', type(uncond_logits))}")
        if uncond_logits.shape != logits.shape:
            raise ValueError(f"uncond_logits must have the shape of logits {tuple(logits.shape)}, got "
                             f"{tuple(uncond_logits.shape)}")
        if uncond_logits.device != logits.device:
            raise ValueError(f"uncond_logits must be on the device of logits ({logits.device}), got "
                             f"{uncond_logits.device}")
    check_params(params, rows, vocab)
    check_generator(generator, rows)
    if finite:
        check_finite("logits", logits)
        if uncond_logits is not None:
            check_finite("uncond_logits", uncond_logits)
