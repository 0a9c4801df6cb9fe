"""Triton nearest-code kernel: rows in blocks of ``BLOCK_N``, codes in blocks of ``BLOCK_K``, running min/argmin.

Each program owns ``BLOCK_N`` rows of ``z`` and walks the codebook ``BLOCK_K`` codes at a time, keeping a
running minimum and its index in registers, so nothing of size ``N × K`` is ever stored. Scores use the
canonical arithmetic of :mod:`tokenloom.kernels.nearest_code` (channels summed in order, one rounding per
product and per sum: the kernel is launched with ``enable_fp_fusion=False`` so the compiler does not contract
them into FMAs), hence the indices equal the reference's bit for bit, ties going to the lowest index.

On a CPU this runs under the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before this module is
imported. The interpreter is slow; it checks correctness, never speed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenloom.kernels.nearest_code import check_nearest_code_inputs, code_norms


@triton.jit
def _nearest_code_kernel(
    z_ptr,  # [N, D] float32, contiguous
    e_ptr,  # [K, D] float32, contiguous
    norms_ptr,  # [K] float32: canonical ||e_k||²
    out_ptr,  # [N] int64
    N,
    K,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    best_val = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        dot = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d in tl.static_range(D):
            z_d = tl.load(z_ptr + rows.to(tl.int64) * D + d, mask=row_ok, other=0.0)
            e_d = tl.load(e_ptr + cols.to(tl.int64) * D + d, mask=col_ok, other=0.0)
            dot = dot + z_d[:, None] * e_d[None, :]
        norms = tl.load(norms_ptr + cols, mask=col_ok, other=0.0)
        scores = norms[None, :] - 2.0 * dot
        scores = tl.where(col_ok[None, :], scores, float("inf"))
        block_val, block_idx = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = block_val < best_val  # strict: an earlier block keeps a tie
        best_val = tl.where(better, block_val, best_val)
        best_idx = tl.where(better, block_idx + k0, best_idx)
    tl.store(out_ptr + rows, best_idx.to(tl.int64), mask=row_ok)


def nearest_code_triton(z: Tensor, codebook: Tensor, *, block_n: int = 32, block_k: int = 64) -> Tensor:
    """``z: [N, D]``, ``codebook: [K, D]`` → ``[N]`` long, equal to ``nearest_code_reference``.

    float32 only (half inputs are upcast); ``block_n``/``block_k`` must be powers of two.
    """
    check_nearest_code_inputs(z, codebook)
    if torch.float64 in (z.dtype, codebook.dtype):
        raise TypeError("the triton nearest-code backend computes in float32; got float64 inputs "
                        "(use backend='torch' or 'reference')")
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    z = z.float().contiguous()
    codebook = codebook.float().contiguous()
    n, dim = z.shape
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    norms = code_norms(codebook).contiguous()
    grid = (triton.cdiv(n, block_n),)
    _nearest_code_kernel[grid](z, codebook, norms, out, n, codebook.shape[0], D=dim, BLOCK_N=block_n,
                               BLOCK_K=block_k, enable_fp_fusion=False)
    return out


__all__ = ["nearest_code_triton"]
