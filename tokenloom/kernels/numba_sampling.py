"""Fused CPU sampler compiled with numba: same contract as ``reference.py``, one kernel per call.

Why our own kernel: the torch path (``torch_sampling.py``) is a chain of ATen calls — ``topk``, gathers,
sorts, ``scatter_add`` — each a full pass with its own temporaries and dispatch cost. No library fuses
guidance, per-row temperature, min-p, top-k, top-p and an index-order draw into one loop nest; numba lets
us write that loop nest in Python and have LLVM vectorise it (AVX2/AVX-512), with no C++ toolchain at
install time. The LLVM pieces numba lacks (fma, NaN-propagating max, compress-store, a vectorisable exp)
are in ``numba_intrinsics.py``.

Per row, all in one compiled call (``_sample_rows``, which releases the GIL), rows in turn on one thread:

1. **pass 1** (the only read of the logits, vectorised): ``x = fma(s, c − u, u)`` (bit-equal to
   :func:`~tokenloom.kernels.reference.guided_logits`), ``z = x / T`` into a scratch row, and the row's
   maximum and minimum, NaN-propagating: a non-finite input makes them non-finite, so the dispatcher skips
   the ``check_finite`` sums of the other paths and, when the kernel reports a row, runs them for the
   usual error (finite inputs whose guided logits overflow go to the reference).
2. **candidate threshold** ``t``, the largest of three safe bounds (each keeps every token that can be
   kept): top-k — the ``r``-th largest of a strided sample of 128 values, ``r`` aimed at ~1.5·k tokens
   (if fewer than ``k`` pass, ``t`` steps down until ``k`` do); min-p — ``max + log(min_p)``; top-p — a
   weight below ``2^-25`` rounds away against the reference's float32 running mass (``>= 1``: the best
   token's weight is 1), so the reference neither counts it in the top-p masses nor keeps it (for
   ``p <= 1 − 2^-23``): ``max − 26·ln 2``. Each bound has a rounding margin.
3. **candidates**: ``z >= t`` compacted in index order by 16-lane compress-stores (one ``vcompressps``
   per 16 tokens on AVX-512), then ``e = exp(z − max)`` (vectorised Sleef ``expf``, ≤ 1 ulp) and min-p.
4. **top-k and top-p by buckets**: candidates go to ``nb`` buckets by value (``(max − z)`` scaled to
   the candidates' range; larger ``z`` → lower bucket, so whole buckets are in rank order). Per-bucket
   counts (top-k) and float64 masses (top-p) locate the one bucket holding each cut; only that bucket's
   few members are sorted (rank: ``z`` descending, ties by index). Tokens in earlier buckets are kept,
   in later buckets dropped. No full sort and no bisection.
5. **draw**: inverse CDF in vocabulary index order over the kept weights, float64, two levels (block sums
   of 64 candidates, then one block), with the row's uniform from
   :func:`~tokenloom.kernels.reference.row_uniforms` — the seeding contract of every path.

Rows in parallel were measured and dropped (32 × 16,384, 2 cores): numba's ``parallel=True`` leaves an OpenMP pool
spinning on the cores torch's own pool needs for the next forward pass, and handing half the rows to a Python
worker thread costs ~80 µs of wake-up, which ate most of the gain (304 µs against 376 µs on one thread).

Same (logits, params, seed) → same token as the reference, except where arithmetic differs at a
boundary (documented, not a bug): guidance and temperature are bit-equal, but ``exp`` is our polynomial
rather than ATen's (they differ by ≤ 1 ulp on ~10% of inputs), the top-p masses are float64 sums per
bucket rather than the reference's float32 cumulative sum in rank order, and the draw sums in another
order. A token differs only when such a rounding difference moves a min-p/top-p cut or the draw target
across a token boundary — measured in ``tests/test_kernels_sampling.py``
(``test_numba_path_matches_reference_token_for_token``).

Speed (``python -m benchmarks.sampling --threads 1``, ``benchmarks/results/sampling_t1.*``; main workload 32 ×
16,384 with a guidance pair, top-k 900, top-p 0.96; median of 5 rounds, methods interleaved so each call finds
the caches as the others left them): 40× faster than transformers' warper chain, 37× faster than the
sort-based filter, 2.55× the floor (one ``amax`` pass over cond and uncond, the logits a guided sampler must
read; rounds 2.41–2.77) and 5.95× one ``amax`` over cond alone. Where it goes (cache-warm loop, µs): one pass
reading both inputs and writing ``z`` 143 (the floor there: 125); + candidates, top-k/top-p, draw: 383 in all;
+ the Python call (input checks, the generator's uniforms, array views): 491.

numba is optional (``pip install tokenloom[fast]``); without it ``sample`` falls back to the torch path.
The first call compiles (~10 s of CPU) and caches the machine code next to this file (``cache=True``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.numba_intrinsics import LANES, compress16, expf, fma, maximum, minimum, order_key

BLOCK = 64  # candidates per block of the two-level draw
SAMPLE = 128  # strided sample of a row for the top-k candidate threshold
SMALL_ROW = 8 * SAMPLE  # rows up to this long take every token as a candidate
MAX_BUCKETS = 2048
# top-p tail: a weight below 2^-25 rounds away against the reference's float32 running mass (>= 1, the best
# token's weight), so it neither enters the top-p masses nor is kept when p <= 1 - 2^-23; 2^-26 for margin
TOP_P_TAIL_LOG, TOP_P_TAIL_MAX_P = -26 * math.log(2), 1 - 2.0**-23
_F = np.float32


# ---- pass 1 and the candidate threshold ----

@numba.njit(cache=True)
def _guide(cond, uncond, guided, scale, t, divide, z):
    """``z = fma(s, c − u, u) / T`` (each step only when on); returns ``(max z, min z)``, NaN if any is."""
    v = z.shape[0]
    hi, lo = _F(-np.inf), _F(np.inf)
    if guided and divide:
        for i in range(v):
            x = fma(scale, cond[i] - uncond[i], uncond[i]) / t
            z[i] = x
            hi, lo = maximum(hi, x), minimum(lo, x)
    elif guided:
        for i in range(v):
            x = fma(scale, cond[i] - uncond[i], uncond[i])
            z[i] = x
            hi, lo = maximum(hi, x), minimum(lo, x)
    elif divide:
        for i in range(v):
            x = cond[i] / t
            z[i] = x
            hi, lo = maximum(hi, x), minimum(lo, x)
    else:
        for i in range(v):
            x = cond[i]
            z[i] = x
            hi, lo = maximum(hi, x), minimum(lo, x)
    return hi, lo


@numba.njit(cache=True)
def _sample_threshold(z, k, sample):
    """A guess ``t`` aimed at ~1.5·k + 4·V/SAMPLE tokens ``z >= t``, from a strided sample (−inf: take all)."""
    v, s = z.shape[0], sample.shape[0]
    rank = int(1.5 * k * s / v) + 4  # from the top of the sample
    if v <= SMALL_ROW or rank >= s:
        return _F(-np.inf)
    stride = v // s
    for j in range(s):
        sample[j] = z[j * stride]
    return _select(sample, s - rank)


@numba.njit(cache=True)
def _select(a, k):
    """The ``k``-th smallest value of ``a`` (0-based), reordering ``a`` in place (Hoare's quickselect)."""
    left, right = 0, a.shape[0] - 1
    while left < right:
        pivot = a[(left + right) // 2]
        i, j = left, right
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            right = j
        elif k >= i:
            left = i
        else:
            break
    return a[k]


@numba.njit(cache=True)
def _count_ge(z, t):
    n = 0
    for i in range(z.shape[0]):
        n += np.int32(z[i] >= t)
    return n


@numba.njit(cache=True)
def _lower_threshold(z, k, t, hi):
    """Step ``t`` down (doubling its distance below the maximum ``hi``) until ``count(z >= t) >= k``."""
    gap = max(float(hi) - float(t), 1e-3)
    while _count_ge(z, t) < k:
        gap *= 2.0
        t = _F(float(hi) - gap) if gap < 1e30 else _F(-np.inf)
    return t


@numba.njit(cache=True)
def _compact(z, t, idx, cz):
    """Indices (index order) and values of ``z >= t`` into ``idx``/``cz``; returns their count."""
    v = z.shape[0]
    n = 0
    i = 0
    while i + LANES <= v:
        n += compress16(z, i, t, idx, cz, n)
        i += LANES
    while i < v:
        idx[n] = i
        cz[n] = z[i]
        n += z[i] >= t
        i += 1
    return n


@numba.njit(cache=True)
def _weights(cz, n, hi, min_p, ce, ck):
    """``ce = exp(cz − hi)`` (0 where below ``min_p``) and ``ck = order_key(cz)`` on the first ``n``
    candidates."""
    for j in range(n):
        e = expf(cz[j] - hi)
        ce[j] = e if e >= min_p else _F(0.0)
        ck[j] = order_key(cz[j])


# ---- top-k and top-p by buckets ----

@numba.njit(cache=True)
def _bucketize(cz, ce, n, hi, lo, nb, bucket, count, mass, with_mass):
    """``bucket[j] = (hi − cz[j]) · (nb − 1) / (hi − lo)`` in ``[0, nb)``: non-increasing in ``cz[j]``, so
    whole buckets are in rank order (``lo``: at most the smallest candidate). Per bucket: the number and
    (if ``with_mass``) the float64 mass of the weights > 0."""
    scale = _F(nb - 1) / max(hi - lo, _F(1e-30))
    top = _F(nb - 1)
    for j in range(n):  # vectorised
        q = (hi - cz[j]) * scale
        bucket[j] = np.int32(q if q < top else top)
    count[:nb] = 0
    for j in range(n):
        count[bucket[j]] += ce[j] > 0
    if with_mass:
        mass[:nb] = 0.0
        for j in range(n):
            mass[bucket[j]] += ce[j]


@numba.njit(cache=True)
def _ranked_members(bucket, ce, ck, n, b, members):
    """Put bucket ``b``'s candidates with weight > 0 in ``members``, in rank order (key descending, ties in
    index order); returns how many."""
    m = 0
    for j in range(n):
        if bucket[j] == b and ce[j] > 0:
            members[m] = j
            m += 1
    if m <= 32:  # the usual case: a stable insertion sort
        for i in range(1, m):
            j, key = members[i], ck[members[i]]
            h = i
            while h > 0 and ck[members[h - 1]] < key:
                members[h] = members[h - 1]
                h -= 1
            members[h] = j
    else:  # many ties or a crowded bucket
        neg_keys = np.empty(m, np.int64)
        for i in range(m):
            neg_keys[i] = -np.int64(ck[members[i]])
        members[:m] = members[:m][np.argsort(neg_keys, kind="mergesort")]
    return m


@numba.njit(cache=True)
def _cut(bucket, ce, ck, n, nb, k, p, count, mass, members):
    """Zero the weights outside top-k (the ``k`` best-ranked weights > 0), then outside top-p (keep a token
    while the mass ranked before it is ``< p · Z``, ``Z`` the top-k mass). The bucket counts and masses
    locate the bucket where each cut falls; only that bucket is sorted. Earlier buckets are kept whole,
    later ones dropped."""
    cut, keep, m, cut_mass = nb, 0, 0, 0.0  # cut == nb: no cut
    total_count = 0
    for b in range(nb):
        total_count += count[b]
    if k < total_count:
        before = 0
        for b in range(nb):
            if before + count[b] >= k:
                cut = b
                break
            before += count[b]
        m = _ranked_members(bucket, ce, ck, n, cut, members)
        keep = k - before
        for i in range(keep):
            cut_mass += np.float64(ce[members[i]])
    if p < 1:
        total = cut_mass
        for b in range(cut):  # cut <= nb
            total += mass[b]
        goal = np.float64(p) * total
        before = 0.0
        for b in range(min(cut + 1, nb)):
            mb = cut_mass if b == cut else mass[b]
            if before + mb >= goal:
                if b < cut:
                    cut = b
                    m = _ranked_members(bucket, ce, ck, n, cut, members)
                    keep = m
                kept = 0
                while kept < keep and before < goal:
                    before += np.float64(ce[members[kept]])
                    kept += 1
                keep = kept
                break
            before += mb
    if cut < nb:
        for j in range(n):
            ce[j] = ce[j] if bucket[j] <= cut else _F(0.0)
        for i in range(keep, m):
            ce[members[i]] = 0.0


# ---- draw ----

@numba.njit(cache=True, fastmath={"reassoc", "nsz"})
def _total(w, n):
    total = 0.0
    for i in range(n):
        total += np.float64(w[i])
    return total


@numba.njit(cache=True)
def _draw(idx, w, n, u, block_sums):
    """Index-order inverse CDF over kept weights ``w`` of candidates ``idx`` (index order)."""
    nb = (n + BLOCK - 1) // BLOCK
    for b in range(nb):
        block_sums[b] = _total(w[b * BLOCK:], min(BLOCK, n - b * BLOCK))
    total = 0.0
    for b in range(nb):
        total += block_sums[b]
    target = u * total
    run = 0.0
    start = nb
    for b in range(nb):  # the first block whose cumulative mass exceeds the target
        if run + block_sums[b] > target:
            start = b
            break
        run += block_sums[b]
    for i in range(start * BLOCK, n):  # then index order (onwards, should rounding disagree)
        run += np.float64(w[i])
        if w[i] > 0 and run > target:
            return idx[i]
    for i in range(n - 1, -1, -1):  # no index above the target: the last kept one
        if w[i] > 0:
            return idx[i]
    return idx[0]


# ---- the kernel ----

@numba.njit(cache=True)
def _scratch(v):
    """Work arrays for rows of ``v`` tokens."""
    return (np.empty(v, np.float32), np.empty(min(SAMPLE, v), np.float32), np.empty(v, np.int32),
            np.empty(v, np.float32), np.empty(v, np.float32), np.empty(v, np.int32), np.empty(v, np.int32),
            np.empty(v, np.int64), np.empty(MAX_BUCKETS, np.int64), np.empty(MAX_BUCKETS, np.float64),
            np.empty(v // BLOCK + 1, np.float64))


@numba.njit(cache=True)
def _sample_row(cond, uncond, guided, scale, params, uniform, scratch):
    """One row's token, or −1 when the row holds a non-finite value (or its guided logits overflow).

    ``params``: float32 ``[4]``: temperature, top_k, top_p, min_p.
    """
    z, sample, idx, cz, ce, ck, bucket, members, count, mass, block_sums = scratch
    v = z.shape[0]
    temperature, top_k, p, mp = params
    greedy = temperature == 0
    hi, lo = _guide(cond, uncond, guided, scale, temperature, not greedy and temperature != 1, z)
    if not (math.isfinite(hi) and math.isfinite(lo)):
        return -1
    if greedy:
        for i in range(v):
            if z[i] == hi:
                return i
    k = int(top_k)
    k = v if k <= 0 or k >= v else k
    margin = _F(1e-3) * (1 + abs(hi))
    t_k = _sample_threshold(z, k, sample) if k < v else _F(-np.inf)
    t_other = _F(-np.inf)  # bounds that never cut a token that can be kept
    if mp > 0:
        t_other = hi + _F(math.log(mp)) - margin
    if p <= TOP_P_TAIL_MAX_P:
        t_other = max(t_other, hi + _F(TOP_P_TAIL_LOG) - margin)
    t = max(t_k, t_other)
    n = _compact(z, t, idx, cz)
    if n < k and t_k > t_other and t_k > lo:  # the sampled guess was too high: fewer than k passed
        t = max(_lower_threshold(z, k, t_k, hi), t_other)
        n = _compact(z, t, idx, cz)
    _weights(cz, n, hi, mp, ce, ck)
    if k < n or p < 1:
        nb = max(16, min(MAX_BUCKETS, n // 2))
        _bucketize(cz, ce, n, hi, max(t, lo), nb, bucket, count, mass, p < 1)
        _cut(bucket, ce, ck, n, nb, k, p, count, mass, members)
    return _draw(idx, ce, n, uniform, block_sums)


@numba.njit(cache=True, nogil=True)
def _sample_rows(cond, uncond, guided, scale, row_params, uniforms, out):
    """Sample every row into ``out``; returns the first row with a non-finite input, or −1.

    ``row_params``: float32 ``[B, 4]`` or ``[1, 4]`` (shared by all rows): temperature, top_k, top_p, min_p.
    """
    scratch = _scratch(cond.shape[1])
    shared = row_params.shape[0] == 1
    for r in range(cond.shape[0]):
        out[r] = _sample_row(cond[r], uncond[r], guided, scale, row_params[0 if shared else r], uniforms[r],
                             scratch)
        if out[r] < 0:
            return r
    return -1


def _row_params(params: SamplingParams, rows: int) -> np.ndarray:
    """float32 ``[1, 4]`` (all scalars) or ``[B, 4]``: temperature, top_k (exact below 2^24), top_p, min_p."""
    fields = (params.temperature, params.top_k, params.top_p, params.min_p)
    if not any(isinstance(f, Tensor) for f in fields):
        return np.array([fields], np.float32)
    out = np.empty((rows, 4), np.float32)
    for j, f in enumerate(fields):
        out[:, j] = f.detach().cpu().numpy() if isinstance(f, Tensor) else f
    return out


def sample_numba(
    logits: Tensor,
    params: SamplingParams,
    uniforms: Tensor,
    uncond_logits: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Draw one index per row of CPU ``logits: [B, V]`` given ``uniforms: [B]`` float64.

    Inputs are assumed checked except for finiteness, which the kernel checks as it reads them.

    Returns:
        ``([B] long tokens, bad_row)``: ``bad_row`` is the first row holding a non-finite logit (then the
        tokens are meaningless and the caller raises), or −1.
    """
    b = logits.shape[0]
    cond = _float32_array(logits)
    guided = uncond_logits is not None and params.guidance_scale != 1.0
    # uncond enters the kernel only if guided (the dispatcher checks an unread uncond itself)
    uncond = _float32_array(uncond_logits) if guided else cond
    out = torch.empty(b, dtype=torch.long)
    row_params, u, out_np = _row_params(params, b), uniforms.detach().to(torch.float64).numpy(), out.numpy()
    return out, _sample_rows(cond, uncond, guided, np.float32(params.guidance_scale), row_params, u, out_np)


def _float32_array(x: Tensor) -> np.ndarray:
    """A C-contiguous float32 numpy view of CPU ``x`` (a copy only when the dtype or layout needs one)."""
    if x.requires_grad:
        x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    return x.numpy()
