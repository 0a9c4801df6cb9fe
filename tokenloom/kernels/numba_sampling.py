"""Fused CPU sampler compiled with numba: same contract as ``reference.py``, one kernel per call.

Why our own kernel: the torch path (``torch_sampling.py``) is a chain of ATen calls — ``topk``, gathers,
sorts, ``scatter_add`` — each a full pass with its own temporaries and dispatch cost, ~30× one ``amax``
over the logits on the main benchmark workload. No library fuses guidance, per-row temperature, min-p,
top-k, top-p and an index-order draw into one loop nest; numba lets us write that loop nest in Python
and have LLVM vectorise it (AVX2/AVX-512), with no C++ toolchain at install time.

Per row, all in one compiled call (``_sample_rows``), rows in turn:

1. **pass 1** (the only read of the logits): ``x = fma(s, c − u, u)`` (bit-equal to
   :func:`~tokenloom.kernels.reference.guided_logits`), ``z = x / T`` into a scratch row; then the row
   maximum and ``Σ z, Σ z²`` over the scratch row (L1/L2). A non-finite input makes those sums non-finite,
   so the dispatcher skips the ``check_finite`` sums of the other paths and, when the kernel reports a
   row, runs them for the usual error (finite inputs whose guided logits overflow go to the reference).
2. **pivot** (rows with top-k): a value ``t`` with ``k <= count(z >= t) <= k + slack``, found by a few
   vectorised counting passes over the scratch row (first guess from the row's mean and deviation,
   then interpolation in ``log count``). Any ``t`` with ``count >= k`` is correct; the slack only bounds
   the work that follows. Rows without top-k take the min-p bound (or every token).
3. **candidates**: the tokens ``z >= t``, compacted in index order (branch-free), with ``e = exp(z − max)``
   by a vectorised ``expf`` (Sleef's u10 polynomial, ≤ 1 ulp).
4. **thresholds** on the candidates, as the Triton kernel does: top-k is the largest order key ``τ`` with
   ``count(key >= τ) >= k`` (bisection snapped to present keys), ties at ``τ`` kept in index order;
   top-p the largest key whose kept mass (float64) reaches ``p · Z``, ties kept in index order while the
   mass before them is ``< p · Z``. No sort anywhere.
5. **draw**: inverse CDF in vocabulary index order over the kept weights, float64, two levels (block sums
   of 64 candidates, then one block), with the row's uniform from
   :func:`~tokenloom.kernels.reference.row_uniforms` — the seeding contract of every path.

Same (logits, params, seed) → same token as the reference, except where arithmetic differs at a
boundary (documented, not a bug): guidance and temperature are bit-equal, but ``exp`` is our polynomial
rather than ATen's (they differ by ≤ 1 ulp on ~10% of inputs), the top-p masses are float64 sums rather
than the reference's float32 cumulative sum, and the draw sums in another order. A token differs only when
such a rounding difference moves a min-p/top-p cut or the draw target across a token boundary — measured
in ``tests/test_kernels_sampling.py`` (``test_numba_path_matches_reference_token_for_token``).

Speed (``benchmarks/sampling.py``, main workload 32 × 16,384, 1 thread): ~1 ms per call on a quiet
machine, ~6–8× faster than the torch path and ~30–40× faster than the warper chain, but ~35× the
``amax`` floor there (26 µs; under load the floor's time grows ~7× and the ratio falls to ~7×). Per row
(µs, quiet, single-row calls): guidance store 3.9, max 1.7, sums 1.6 — already ~9× the floor's 0.8 µs per
row, because the floor reads one input and we must read two and write ``z`` — then pivot + branch-free
compaction ~10, top-k bisection ~3, top-p bisection ~5. Within 3× of one ``amax`` would leave ~1.6 µs per
row for everything after reading both inputs; the scalar compaction alone exceeds that. What would close
more of the gap: SIMD compress-stores (AVX-512 ``vcompressps``, not reachable from numba), a pivot from a
sample taken during pass 1 so the compaction fuses into it, and parallel rows (``prange``).

numba is optional (``pip install tokenloom[fast]``); without it ``sample`` falls back to the torch path.
The first call compiles (~10 s of CPU) and caches the machine code next to this file (``cache=True``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.reference import row_params

BLOCK = 64  # candidates per block of the two-level draw
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


# ---- LLVM intrinsics: single-rounding fma, vectorisable max and round-to-nearest-even ----

def _call_intrinsic(name: str, arity: int):
    """codegen calling the float32 LLVM intrinsic ``name`` on the arguments."""
    def codegen(context, builder, signature, llargs):
        f = ir.FloatType()
        callee = builder.module.declare_intrinsic(name, [f], ir.FunctionType(f, [f] * arity))
        return builder.call(callee, llargs)

    return codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """``a·b + c`` rounded once."""
    return types.float32(types.float32, types.float32, types.float32), _call_intrinsic("llvm.fma", 3)


@intrinsic
def _maxnum(typingctx, a, b):
    """max (LLVM vectorises this reduction; a select-based max it does not)."""
    return types.float32(types.float32, types.float32), _call_intrinsic("llvm.maxnum", 2)


@intrinsic
def _rint(typingctx, a):
    """Round to nearest, ties to even."""
    return types.float32(types.float32), _call_intrinsic("llvm.rint", 1)


_F = np.float32
_R_LN2, _L2U, _L2L = _F(1.4426950408889634), _F(0.693145751953125), _F(1.428606765330187045e-06)
_C = (_F(0.000198527617612853646278381), _F(0.00139304355252534151077271), _F(0.00833336077630519866943359),
      _F(0.0416664853692054748535156), _F(0.166666671633720397949219), _F(0.5))
_C0, _C1, _C2, _C3, _C4, _C5 = _C


@numba.njit(inline="always")
def _expf(d):
    """``exp(d)`` for float32 ``d <= 0`` (Sleef's u10 algorithm; 0 below −104)."""
    qf = _rint(d * _R_LN2)
    q = np.int32(qf)
    s = _fma(qf, -_L2U, d)
    s = _fma(qf, -_L2L, s)
    u = _fma(_C0, s, _C1)
    u = _fma(u, s, _C2)
    u = _fma(u, s, _C3)
    u = _fma(u, s, _C4)
    u = _fma(u, s, _C5)
    u = _F(1.0) + _fma(s * s, u, s)
    q1 = q >> 1
    p1 = np.int32((q1 + 127) << 23)
    p2 = np.int32((q - q1 + 127) << 23)
    u = u * _as_float(p1) * _as_float(p2)
    return u if d >= _F(-104.0) else _F(0.0)


@intrinsic
def _as_float(typingctx, i):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, llargs):
        return builder.bitcast(llargs[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _as_int(typingctx, f):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, llargs):
        return builder.bitcast(llargs[0], ir.IntType(32))

    return sig, codegen


@numba.njit(inline="always")
def _key(z):
    """Order-preserving int32 key of float32 ``z`` (+0.0 and −0.0 share key 0)."""
    b = _as_int(z + _F(0.0))
    return b ^ ((b >> 31) & 0x7FFFFFFF)


# ---- pass 1 and the pivot (streaming over the row) ----

@numba.njit(cache=True)
def _guide(cond, uncond, guided, scale, t, divide, z):
    """``z = fma(s, c − u, u) / T`` (each step only when on). A loop of its own: LLVM vectorises it, and
    the reductions in :func:`_max` and :func:`_sums`, but not one loop holding both."""
    v = z.shape[0]
    if guided and divide:
        for i in range(v):
            z[i] = _fma(scale, cond[i] - uncond[i], uncond[i]) / t
    elif guided:
        for i in range(v):
            z[i] = _fma(scale, cond[i] - uncond[i], uncond[i])
    elif divide:
        for i in range(v):
            z[i] = cond[i] / t
    else:
        z[:] = cond


@numba.njit(cache=True)
def _max(z):
    m = _F(-np.inf)
    for i in range(z.shape[0]):
        m = _maxnum(m, z[i])
    return m


@numba.njit(cache=True, fastmath={"reassoc", "nsz"})
def _sums(z):
    """(Σ z, Σ z²): not finite iff some z is not finite (or the sums overflow). Not ``Σ (z − z)``: LLVM
    folds that to 0 under these flags. Separate from :func:`_max`: one loop of both is not vectorised."""
    s1 = _F(0.0)
    s2 = _F(0.0)
    for i in range(z.shape[0]):
        zi = z[i]
        s1 += zi
        s2 += zi * zi
    return s1, s2


@numba.njit(cache=True)
def _count_ge(z, t):
    n = 0
    for i in range(z.shape[0]):
        n += z[i] >= t
    return n


@numba.njit(cache=True)
def _pivot(z, k, m, mean, sq):
    """A value ``t`` with ``count(z >= t) >= k`` (and at most ~1.25·k + 64 when the counts allow)."""
    v = z.shape[0]
    cap = k + max(64, k // 4)
    std = math.sqrt(max(sq - mean * mean, 1e-12))
    # Gaussian tail guess aimed at ~1.1·k tokens (the interpolation below fixes non-Gaussian rows).
    q = min(1.0, 1.1 * k / v)
    guess = mean + std * _probit_upper(q)
    lo, c_lo = -np.inf, v  # count(z >= lo) = c_lo >= k
    hi, c_hi = float(m) + 1.0, 0  # count(z >= hi) = c_hi < k
    t = min(guess, float(m))
    step = 0.5 * std
    for _ in range(40):
        c = _count_ge(z, _F(t))
        if c >= k:
            if c <= cap:
                return _F(t), c
            lo, c_lo = t, c
        else:
            hi, c_hi = t, c
        if lo == -np.inf:  # no lower end yet: step down, doubling
            t = t - step
            step *= 2.0
            continue
        # interpolate log(count) linearly in t between the ends, aiming at k + slack / 2
        aim = math.log(k + (cap - k) / 2)
        a, b = math.log(c_lo), math.log(max(c_hi, 0.5))
        nt = lo + (hi - lo) * (a - aim) / (a - b) if a > b else 0.5 * (lo + hi)
        if not (lo < nt < hi):
            nt = 0.5 * (lo + hi)
        if _F(nt) == _F(lo) or _F(nt) == _F(hi):  # no float32 strictly between: take the low end
            break
        t = nt
    return _F(lo), c_lo


@numba.njit(inline="always")
def _probit_upper(q):
    """x with P(N(0,1) > x) ≈ q (Acklam-free rational approximation, ~1e-3 accurate; a guess only)."""
    if q >= 0.5:
        return 0.0
    tt = math.sqrt(-2.0 * math.log(q))
    return tt - (2.515517 + 0.802853 * tt + 0.010328 * tt * tt) / (
        1.0 + 1.432788 * tt + 0.189269 * tt * tt + 0.001308 * tt * tt * tt)


@numba.njit(cache=True)
def _compact(z, t, idx, cz):
    """Indices (index order) and values of ``z >= t``; returns their count. Branch-free: the index store
    is unconditional, the count advances on a hit; the values are gathered after, for the hits only."""
    n = 0
    for i in range(z.shape[0]):
        idx[n] = i
        n += z[i] >= t
    for j in range(n):
        cz[j] = z[idx[j]]
    return n


# ---- candidate stage ----

@numba.njit(cache=True)
def _weights(cz, n, m, ce, ck):
    """``ce = exp(cz − m)`` and ``ck = key(cz)`` on the first ``n`` candidates."""
    for i in range(n):
        ce[i] = _expf(cz[i] - m)
        ck[i] = _key(cz[i])


@numba.njit(cache=True)
def _kth_key(ck, n, k):
    """Largest key τ with ``count(key >= τ) >= k`` over ``ck[:n]`` (``n >= k``): bisection snapped to
    present keys (each step moves an end onto a key), so it ends when the bracket holds one key."""
    lo, hi = INT_MAX, INT_MIN
    for i in range(n):
        lo = min(lo, ck[i])
        hi = max(hi, ck[i])
    while hi > lo:
        mid = lo + (hi - lo + 1) // 2
        count = 0
        up, down = INT_MAX, INT_MIN
        for i in range(n):
            kk = ck[i]
            ge = kk >= mid
            count += ge
            up = min(up, kk if ge else INT_MAX)
            down = max(down, INT_MIN if ge else kk)
        if count >= k:
            lo = up
        else:
            hi = down
    return lo


@numba.njit(cache=True, fastmath={"reassoc", "nsz"})
def _mass_ge(kk, ww, n, mid):
    """Σ ww over ``kk >= mid``, the smallest such key and the largest key below."""
    mass = 0.0
    up, down = INT_MAX, INT_MIN
    for i in range(n):
        ki = kk[i]
        ge = ki >= mid
        mass += ww[i] if ge else 0.0
        up = min(up, ki if ge else INT_MAX)
        down = max(down, INT_MIN if ge else ki)
    return mass, up, down


@numba.njit(cache=True, fastmath={"reassoc", "nsz"})
def _total(w, n):
    total = 0.0
    for i in range(n):
        total += np.float64(w[i])
    return total


@numba.njit(cache=True)
def _top_p(ck, w, n, p, kk, ww):
    """Zero the weights ``w`` outside the top-p set (rank order, ties in index order)."""
    m = 0
    for i in range(n):  # the kept tokens, dense
        kk[m] = ck[i]
        ww[m] = w[i]
        m += w[i] > 0
    total = _total(ww, m)
    goal = np.float64(p) * total
    lo, hi = INT_MAX, INT_MIN
    for i in range(m):
        lo = min(lo, kk[i])
        hi = max(hi, kk[i])
    while hi > lo:  # largest key τ with mass(key >= τ) >= goal
        mid = lo + (hi - lo + 1) // 2
        mass, up, down = _mass_ge(kk, ww, m, mid)
        if mass >= goal:
            lo = up
        else:
            hi = down
    above = 0.0
    for i in range(m):
        above += ww[i] if kk[i] > lo else 0.0
    before = above
    for i in range(n):  # keys above τ stay; ties at τ in index order while the mass before is < goal
        if w[i] > 0:
            if ck[i] < lo:
                w[i] = 0.0
            elif ck[i] == lo:
                if before < goal:
                    before += np.float64(w[i])
                else:
                    w[i] = 0.0


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


@numba.njit(cache=True)
def _sample_rows(cond, uncond, guided, scale, temperature, top_k, top_p, min_p, uniforms, out):
    """Sample every row; returns the first row with a non-finite input, or −1."""
    b, v = cond.shape
    z = np.empty(v, np.float32)
    idx = np.empty(v + 1, np.int32)
    cz = np.empty(v, np.float32)
    ce = np.empty(v, np.float32)
    ck = np.empty(v, np.int32)
    kk = np.empty(v, np.int32)
    ww = np.empty(v, np.float64)
    block_sums = np.empty(v // BLOCK + 1, np.float64)
    for r in range(b):
        t_r = temperature[r]
        greedy = t_r == 0
        _guide(cond[r], uncond[r], guided, scale, t_r, not greedy and t_r != 1, z)
        m = _max(z)
        s1, s2 = _sums(z)
        if not (math.isfinite(s1) and math.isfinite(s2)):  # a non-finite input (or overflow): caller checks
            return r
        mean, sq = s1 / v, s2 / v
        if greedy:
            for i in range(v):
                if z[i] == m:
                    out[r] = i
                    break
            continue
        k = top_k[r]
        k = v if k <= 0 or k >= v else k
        mp = min_p[r]
        if k < v:
            t, _ = _pivot(z, k, m, mean, sq)
        elif mp > 0:
            t = m + _F(math.log(mp)) - _F(1e-3) * (1 + abs(m))
        else:
            t = _F(-np.inf)
        n = _compact(z, t, idx, cz)
        _weights(cz, n, m, ce, ck)
        if k < v:  # top-k: keys above τ, ties at τ in index order up to k
            tau = _kth_key(ck, n, k)
            above = 0
            for i in range(n):
                above += ck[i] > tau
            need = k - above
            for i in range(n):
                if ck[i] < tau:
                    ce[i] = 0.0
                elif ck[i] == tau:
                    if need > 0:
                        need -= 1
                    else:
                        ce[i] = 0.0
        if mp > 0:  # min-p on the weights, as the reference: e >= min_p
            for i in range(n):
                ce[i] = ce[i] if ce[i] >= mp else _F(0.0)
        if top_p[r] < 1:
            _top_p(ck, ce, n, top_p[r], kk, ww)
        out[r] = _draw(idx, ce, n, uniforms[r], block_sums)
    return -1


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
    b, v = logits.shape
    cond = logits.detach().float().contiguous()
    guided = uncond_logits is not None and params.guidance_scale != 1.0
    # uncond is read (and checked for finiteness) whenever given; it enters the arithmetic only if guided
    uncond = uncond_logits.detach().float().contiguous() if uncond_logits is not None else cond
    temperature, top_k, top_p, min_p = row_params(params, b, "cpu")
    out = np.empty(b, np.int64)
    bad = _sample_rows(cond.numpy(), uncond.numpy(), guided, np.float32(params.guidance_scale),
                       temperature.numpy(), top_k.numpy(), top_p.numpy(), min_p.numpy(),
                       uniforms.to(torch.float64).numpy(), out)
    return torch.from_numpy(out), int(bad)
