"""Fused sampling and code-lookup kernels (DESIGN.md §5).

``sample(logits, params, generator, *, uncond_logits=None, backend=None) -> indices`` is the one
entry point: ``backend=None`` picks the best available path (Triton on CUDA; on CPU the numba kernel when numba is
installed — ``tokenloom[fast]`` — else the fast torch path), ``"reference"`` the plain path used by
tests, ``"numba"`` the fused CPU kernel, ``"torch-compiled"`` the torch path with its elementwise stages
through ``torch.compile`` (opt-in: the first call compiles for ~20 s).

Every path implements one contract (``reference.py``): the same logits, params and generator state give
the same token on every path, up to float rounding at a boundary (documented per path). The only
randomness is one float64 uniform per row (:func:`row_uniforms`), so with a list of generators row
``i`` depends only on ``generator[i]``.

Bitwise tokens: :func:`sample_bits`. Speculative decoding: :func:`speculative_accept`. VQ nearest code
without the ``[N, K]`` distance matrix: :func:`nearest_code`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.bits import sample_bits
from tokenloom.kernels.checks import check_finite, check_sample_inputs
from tokenloom.kernels.nearest_code import nearest_code
from tokenloom.kernels.reference import filtered_probs, filtered_weights, row_uniforms, sample_reference
from tokenloom.kernels.speculative import speculative_accept
from tokenloom.kernels.torch_sampling import sample_torch

BACKENDS = ("reference", "torch", "torch-compiled", "triton", "numba")


@functools.cache
def numba_available() -> bool:
    """The fused CPU kernel needs numba (optional: ``pip install tokenloom[fast]``)."""
    return importlib.util.find_spec("numba") is not None


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices (and on CPU tensors only under ``TRITON_INTERPRET=1``)."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
        backend: None (best available), ``"reference"``, ``"torch"``, ``"torch-compiled"``, ``"triton"`` or
            ``"numba"`` (CPU logits).

    Returns:
        ``[B]`` long indices.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend is None:
        device = logits.device if isinstance(logits, Tensor) else None
        if device is not None and triton_available(device):
            backend = "triton"
        elif device is not None and device.type == "cpu" and numba_available():
            backend = "numba"
        else:
            backend = "torch"
    check_sample_inputs(logits, params, uncond_logits, generator, finite=backend != "numba")
    uniforms = row_uniforms(generator, logits.shape[0], logits.device)[:, 0]
    if backend == "numba":  # no autograd to switch off: the kernel reads the tensors' memory
        return _sample_numba(logits, params, uniforms, uncond_logits)
    with torch.no_grad():
        return _sample_torch_family(backend, logits, params, uniforms, uncond_logits)


def _sample_torch_family(backend: str, logits: Tensor, params: SamplingParams, uniforms: Tensor,
                         uncond_logits: Tensor | None) -> Tensor:
    """The reference, torch and Triton paths (under ``no_grad``)."""
    if backend == "reference":
        return sample_reference(logits, params, uniforms, uncond_logits)
    if backend == "triton":
        if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA logits (or TRITON_INTERPRET=1 set before triton is "
                             f"imported), got logits on {logits.device}")
        from tokenloom.kernels.triton_sampling import sample_triton  # imports triton only when asked

        return sample_triton(logits, params, uniforms, uncond_logits)
    return sample_torch(logits, params, uniforms, uncond_logits, compile=backend == "torch-compiled")


def _sample_numba(logits: Tensor, params: SamplingParams, uniforms: Tensor, uncond_logits: Tensor | None) -> Tensor:
    """The numba kernel; it reports non-finite values as it reads them, and the usual check names them."""
    if logits.device.type != "cpu":
        raise ValueError(f"backend='numba' needs CPU logits, got logits on {logits.device}")
    if not numba_available():
        raise ValueError("backend='numba' needs numba: pip install 'tokenloom[fast]'")
    from tokenloom.kernels.numba_sampling import sample_numba  # imports numba only when asked

    if uncond_logits is not None and params.guidance_scale == 1.0:
        check_finite("uncond_logits", uncond_logits)  # given but not read by the kernel
    tokens, bad_row = sample_numba(logits, params, uniforms, uncond_logits)
    if bad_row >= 0:
        check_finite("logits", logits)
        if uncond_logits is not None:
            check_finite("uncond_logits", uncond_logits)
        # finite inputs whose guided / tempered logits overflow: the reference handles them as it does
        return sample_reference(logits, params, uniforms, uncond_logits)
    return tokens


__all__ = [
    "BACKENDS",
    "filtered_probs",
    "filtered_weights",
    "nearest_code",
    "numba_available",
    "row_uniforms",
    "sample",
    "sample_bits",
    "speculative_accept",
    "triton_available",
]
