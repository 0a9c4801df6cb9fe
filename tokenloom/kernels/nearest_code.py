"""Nearest codebook entry, ``argmin_k ||z_n - e_k||²``, without materialising the ``[N, K]`` distance matrix.

``nearest_code(z, codebook, backend=None)`` is the one entry point; three backends compute it:

* ``"reference"``: the full ``[N, K]`` score matrix in the canonical arithmetic below, then ``argmin``.
  Plain and memory hungry; the yardstick for tests.
* ``"torch"`` (CPU default): blocks of ``block_n`` rows against blocks of ``block_k`` codes with a running
  minimum (one reused ``[block_n, block_k]`` buffer: 128 MiB at the defaults). Each block is screened with one
  BLAS call (``addmm``) and one grouped ``amin`` pass; rows whose best and runner-up scores lie within the
  rounding bound of that BLAS call (near-ties, exact ties) are re-decided in the canonical arithmetic, so the
  result equals the reference's bit for bit. ``benchmarks/nearest_code.py`` measures it against
  ``torch.cdist`` + ``argmin``.
* ``"triton"`` (CUDA default): a Triton kernel blocked over rows and codes with a running min/argmin,
  written in the canonical arithmetic with FMA contraction disabled (``triton_nearest_code.py``).

Canonical arithmetic (one definition, so every backend returns the same index):

* ``||e_k||²`` and ``z_n · e_k`` are summed sequentially over the ``D`` channels, ``d = 0, 1, ...``, every
  product and every partial sum rounded to the compute dtype (no fused multiply-add);
* ``score[n, k] = ||e_k||² - 2 (z_n · e_k)``; the constant ``||z_n||²`` is left out (it does not change the
  argmin and adding it would only round away small gaps);
* ties go to the **lowest index** (``torch.argmin``'s rule, LlamaGen's and VAR's behaviour).

The compute dtype is float64 when either input is float64, else float32 (half inputs are upcast).
Why our own code: BLAS results depend on the blocking (a row block and the full matrix can differ in the
last bit), so a plain chunked ``cdist``/``addmm`` argmin cannot promise the reference's indices on near-ties.
"""

from __future__ import annotations

import torch
from torch import Tensor

BACKENDS = ("reference", "torch", "triton")

# Safety factor on the textbook bound |fl(x·y) - x·y| <= γ_D Σ|x_d y_d| for the BLAS screening pass.
_BOUND_SAFETY = 4.0
# Unit round-off of float32 matmuls under torch.set_float32_matmul_precision (bf16 / tf32 inner products).
_MATMUL_UNIT_ROUNDOFF = {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}


def _compute_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32


def check_nearest_code_inputs(z: Tensor, codebook: Tensor) -> None:
    """Raise TypeError/ValueError for inputs no backend can honour (before any compute)."""
    for name, t in (("z", z), ("codebook", codebook)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D ({'[N, D]' if name == 'z' else '[K, D]'}), got {tuple(t.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"z and codebook must have the same dim D, got z {tuple(z.shape)} and codebook "
                         f"{tuple(codebook.shape)}")
    if codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise ValueError(f"codebook must have shape [K, D] with K, D >= 1, got {tuple(codebook.shape)}")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got {z.device} and {codebook.device}")
    for name, t in (("z", z), ("codebook", codebook)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values; the nearest code is undefined")


def code_norms(codebook: Tensor) -> Tensor:
    """``codebook: [K, D]`` → ``[K]`` squared norms, summed sequentially over ``D`` (canonical arithmetic)."""
    norms = codebook[:, 0] * codebook[:, 0]
    for d in range(1, codebook.shape[1]):
        norms = norms + codebook[:, d] * codebook[:, d]
    return norms


def canonical_scores(z: Tensor, codebook: Tensor, norms: Tensor) -> Tensor:
    """``z: [n, D]``, ``codebook: [k, D]``, ``norms: [k]`` → ``[n, k]`` scores ``||e||² - 2 z·e``.

    Purely elementwise (one rounding per product and per sum, channels in order), so a block of this
    matrix is bit-identical to the same entries of the full matrix.
    """
    dot = z[:, 0, None] * codebook[None, :, 0]
    for d in range(1, z.shape[1]):
        dot.add_(z[:, d, None] * codebook[None, :, d])
    return dot.mul_(-2.0).add_(norms)


def nearest_code_reference(z: Tensor, codebook: Tensor) -> Tensor:
    """``z: [N, D]``, ``codebook: [K, D]`` → ``[N]`` long; materialises the full ``[N, K]`` score matrix."""
    check_nearest_code_inputs(z, codebook)
    dtype = _compute_dtype(z, codebook)
    z, codebook = z.to(dtype), codebook.to(dtype)
    if z.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=z.device)
    return canonical_scores(z, codebook, code_norms(codebook)).argmin(dim=1)


def _canonical_argmin_blocked(z: Tensor, codebook: Tensor, norms: Tensor, block_k: int) -> Tensor:
    """Canonical argmin for a few rows, blocked over codes with a running min (first index wins ties)."""
    best_val = torch.full((z.shape[0],), float("inf"), dtype=z.dtype, device=z.device)
    best_idx = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    for k0 in range(0, codebook.shape[0], block_k):
        scores = canonical_scores(z, codebook[k0:k0 + block_k], norms[k0:k0 + block_k])
        val, idx = scores.min(dim=1)
        better = val < best_val  # strict: an earlier block keeps a tie
        best_val = torch.where(better, val, best_val)
        best_idx = torch.where(better, idx + k0, best_idx)
    return best_idx


def _best_two(scores: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """``scores: [rows, cols]`` (``cols`` a multiple of ``group``) → best value, its column, runner-up value.

    ``min(dim)`` with indices is ~10x slower than ``amin`` on a CPU, so the one full pass is a grouped
    ``amin``; indices are then found inside the best group only (``rows × group`` entries).
    """
    rows, cols = scores.shape
    grouped = scores.view(rows, cols // group, group)
    group_min = grouped.amin(dim=2)  # [rows, cols / group]
    _, best_group = group_min.min(dim=1)
    second_group = group_min.scatter_(1, best_group[:, None], float("inf")).amin(dim=1)
    inside = grouped[torch.arange(rows, device=scores.device), best_group]  # [rows, group], a copy
    best_val, pos = inside.min(dim=1)
    second_inside = inside.scatter_(1, pos[:, None], float("inf")).amin(dim=1)
    return best_val, best_group * group + pos, torch.minimum(second_group, second_inside)


def nearest_code_torch(z: Tensor, codebook: Tensor, *, block_n: int = 4096, block_k: int = 8192,
                       group: int = 128) -> Tensor:
    """Blocked nearest code with a running minimum; memory ``O(block_n · block_k)``, not ``O(N · K)``.

    Per block, one ``addmm`` into a reused buffer gives scores within ``tol`` of the exact value (``tol`` from
    the standard dot-product error bound, ×4 for safety), and a grouped ``amin`` pass gives each row's best and
    runner-up score. A row whose runner-up is more than ``4 tol`` above its best is settled (its screening
    argmin is then also the canonical argmin); other rows (ties and near-ties) are re-decided in the canonical
    arithmetic. The codebook is padded to a multiple of ``group`` with zero codes of infinite norm (scores
    ``+inf``). Returns ``[N]`` long, equal to :func:`nearest_code_reference`.
    """
    check_nearest_code_inputs(z, codebook)
    for name, value in (("block_n", block_n), ("block_k", block_k), ("group", group)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    dtype = _compute_dtype(z, codebook)
    z, codebook = z.to(dtype), codebook.to(dtype)
    n, dim = z.shape
    num_codes = codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=z.device)
    if n == 0:
        return out
    norms = code_norms(codebook)
    if dtype == torch.float64:
        unit = 2.0**-53
    else:
        unit = _MATMUL_UNIT_ROUNDOFF.get(torch.get_float32_matmul_precision(), 2.0**-8)
    # Every score term is bounded by ||e||² + 2 ||z|| ||e|| (Cauchy-Schwarz); both paths err by at most tol.
    max_norm = float(norms.max().sqrt())
    gamma = _BOUND_SAFETY * (dim + 2) * unit
    z_norms = z.norm(dim=1)
    tiny = torch.finfo(dtype).tiny
    inf = float("inf")
    group = min(group, num_codes)
    padded = -(-num_codes // group) * group
    block_k = min(max(group, block_k // group * group), padded)
    codebook_t = torch.zeros(dim, padded, dtype=dtype, device=z.device)
    codebook_t[:, :num_codes] = codebook.t()
    padded_norms = torch.full((padded,), inf, dtype=dtype, device=z.device)
    padded_norms[:num_codes] = norms
    # One scores buffer, reused: fresh [block_n, block_k] allocations cost page faults on every block.
    buffer = torch.empty(min(block_n, n) * block_k, dtype=dtype, device=z.device)
    for n0 in range(0, n, block_n):
        zb = z[n0:n0 + block_n]
        rows = zb.shape[0]
        tol = gamma * (max_norm * max_norm + 2.0 * z_norms[n0:n0 + block_n] * max_norm) + tiny
        best_val = second_val = best_idx = None
        for k0 in range(0, padded, block_k):
            cols = min(block_k, padded - k0)
            scores = buffer[: rows * cols].view(rows, cols)
            torch.addmm(padded_norms[k0:k0 + cols], zb, codebook_t[:, k0:k0 + cols], alpha=-2.0, out=scores)
            val, idx, runner_up = _best_two(scores, group)
            if best_val is None:
                best_val, best_idx, second_val = val, idx, runner_up
                continue
            second_val = torch.minimum(torch.minimum(second_val, runner_up), torch.maximum(best_val, val))
            better = val < best_val  # strict: an earlier block keeps a tie
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + k0, best_idx)
        ambiguous = (second_val <= best_val + 4.0 * tol).nonzero().squeeze(1)
        if ambiguous.numel():
            best_idx[ambiguous] = _canonical_argmin_blocked(zb[ambiguous], codebook, norms, block_k)
        out[n0:n0 + block_n] = best_idx
    return out


def nearest_code(z: Tensor, codebook: Tensor, backend: str | None = None) -> Tensor:
    """Index of the nearest codebook row for each row of ``z`` (squared L2; lowest index on ties).

    Args:
        z: ``[N, D]`` float vectors.
        codebook: ``[K, D]`` float codes.
        backend: None (Triton on CUDA, the blocked torch path otherwise), ``"reference"``, ``"torch"``
            or ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Returns:
        ``[N]`` long indices in ``[0, K)``; every backend returns the same indices (see module docstring).
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend is None:
        backend = "triton" if getattr(z, "is_cuda", False) and _triton_available() else "torch"
    if backend == "reference":
        return nearest_code_reference(z, codebook)
    if backend == "torch":
        return nearest_code_torch(z, codebook)
    from tokenloom.kernels.triton_nearest_code import nearest_code_triton

    return nearest_code_triton(z, codebook)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = [
    "BACKENDS",
    "canonical_scores",
    "check_nearest_code_inputs",
    "code_norms",
    "nearest_code",
    "nearest_code_reference",
    "nearest_code_torch",
]
