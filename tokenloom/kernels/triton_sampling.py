"""Triton sampling kernel for GPUs: same contract as ``reference.py``, no sort.

Why our own kernel: guidance, temperature, min-p, top-k, top-p and the draw fused into one launch with
per-row parameters; the truncation sets are found by threshold search (as FlashInfer does) instead of
sorting the vocabulary.

One program handles ``ROWS`` rows (a ``[ROWS, BLOCK]`` tile; ``ROWS > 1`` only for small vocabularies).
The logits are read once: pass 1 applies guidance and temperature and keeps ``z`` in registers when the
row fits one ``BLOCK`` — otherwise it writes ``z`` to a float32 scratch row that the later passes reread
(from L2 on a GPU). Thresholds are bisections over the order-preserving ``int32`` key of ``z`` (32 passes
pin the exact value of any order statistic):

* top-k: the largest key ``τ`` with ``count(key >= τ) >= k``; ties at ``τ`` are kept in index order up to
  ``k`` (one scan for the cut-off index).
* top-p: the largest key ``τ`` whose mass ``F(τ) = Σ e·[key >= τ]`` reaches ``p · Z``; ties at ``τ`` kept
  in index order while the mass before them is ``< p · Z``.
* draw: one index-order scan (float64 running sum) for the first index whose cumulative kept weight
  exceeds ``U · total``, ``U`` the row's uniform. The uniforms come from the row's ``torch.Generator``
  (:func:`tokenloom.kernels.reference.row_uniforms`), not from Triton's philox, so the Triton path draws
  the same token as the torch paths for the same generator state.

Where arithmetic differs from the CPU paths (documented, not a bug): guidance is one ``tl.fma`` (bit-equal
to the CPU paths), but ``tl.exp`` is not bit-identical to ATen's ``exp`` and masses are tree sums rather
than sequential ones — so a token can differ when a draw or a top-p/min-p cut lands within float rounding
of a boundary.
Under ``TRITON_INTERPRET=1`` (numpy) the same source runs on CPU for the tests.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.reference import row_params

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KEY_MIN = tl.constexpr(-2147483648)  # below the key of every finite float


@triton.jit
def _key(z):
    """Order-preserving int32 key of float32 ``z`` (+0.0 and -0.0 share key 0), widened to int64."""
    bits = z.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(z == 0.0, 0, key)
    return key.to(tl.int64)


@triton.jit
def _state(z_ptr, offs, mask, z_reg, m, min_p, SINGLE: tl.constexpr, DO_MINP: tl.constexpr):
    """One tile's ``(z, key, alive, e)``: ``z`` from registers (single-block rows) or the scratch row;
    ``alive`` = in bounds and a min-p survivor; ``e = exp(z − max)`` on survivors, else 0."""
    if SINGLE:
        z = z_reg
    else:
        z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    e = tl.exp(z - m[:, None])
    alive = mask
    if DO_MINP:
        alive = alive & (e >= min_p[:, None])
    bits = z.to(tl.int32, bitcast=True)  # the order-preserving key, as in _key (inlined: interpreter cost)
    key = tl.where(z == 0.0, 0, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)).to(tl.int64)
    return z, key, alive, tl.where(alive, e, 0.0)


@triton.jit
def _in_cut(key, cols, tau, cut):
    """``key > τ``, or ``key == τ`` and the column is before the tie cut-off."""
    return (key > tau[:, None]) | ((key == tau[:, None]) & (cols < cut[:, None]))


@triton.jit
def _sample_kernel(
    cond_ptr, uncond_ptr, z_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, u_ptr, out_ptr,
    n_rows, vocab, scale,
    HAS_UNCOND: tl.constexpr, EXACT_FMA: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, NUM_BLOCKS: tl.constexpr,
    DO_TOPK: tl.constexpr, DO_TOPP: tl.constexpr, DO_MINP: tl.constexpr,
):
    SINGLE: tl.constexpr = NUM_BLOCKS == 1
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    base = rows.to(tl.int64)[:, None] * vocab
    lane = tl.arange(0, BLOCK)[None, :]
    temperature = tl.load(temp_ptr + rows, mask=row_ok, other=1.0)
    greedy = temperature == 0.0
    inv_t = tl.where(greedy, 1.0, temperature)
    top_k = tl.load(topk_ptr + rows, mask=row_ok, other=0)
    top_p = tl.load(topp_ptr + rows, mask=row_ok, other=1.0)
    min_p = tl.load(minp_ptr + rows, mask=row_ok, other=0.0)
    u = tl.load(u_ptr + rows, mask=row_ok, other=0.0)

    # Pass 1: the only read of the logits. z = guided / T, row max.
    m = tl.full([ROWS], float("-inf"), tl.float32)
    z_reg = tl.zeros([ROWS, BLOCK], tl.float32)
    for blk in range(NUM_BLOCKS):
        cols = blk * BLOCK + lane
        mask = row_ok[:, None] & (cols < vocab)
        x = tl.load(cond_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_UNCOND:
            xu = tl.load(uncond_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
            if EXACT_FMA:
                x = tl.fma(x - xu, scale, xu)  # rounded once, as torch.add(u, d, alpha=s) on CPU
            else:  # the interpreter's fma rounds twice; float64 (s·d exact) then one rounding instead
                x = (xu.to(tl.float64) + (x - xu).to(tl.float64) * scale).to(tl.float32)
        z = x / inv_t[:, None]
        m = tl.maximum(m, tl.max(tl.where(mask, z, float("-inf")), axis=1))
        if SINGLE:
            z_reg = z
        else:
            tl.store(z_ptr + base + cols, z, mask=mask)
    m = tl.where(row_ok, m, 0.0)
    if not SINGLE:
        tl.debug_barrier()  # the scratch row is complete before the passes that reread it

    # Pass 2: the smallest surviving key and the survivor count (bisection brackets).
    key_lo = tl.full([ROWS], 2147483647, tl.int64)
    n_alive = tl.zeros([ROWS], tl.int64)
    for blk in range(NUM_BLOCKS):
        cols = blk * BLOCK + lane
        mask = row_ok[:, None] & (cols < vocab)
        z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
        key_lo = tl.minimum(key_lo, tl.min(tl.where(alive, key, 2147483647), axis=1))
        n_alive += tl.sum(alive.to(tl.int64), axis=1)
    key_hi = _key(m)

    # top-k: the largest key τ with count(key >= τ) >= k (bisection snapped to present keys, so it ends
    # after at most min(32, distinct keys) passes), then the index cut-off among ties at τ.
    tau_k = tl.full([ROWS], KEY_MIN, tl.int64)
    cut_k = tl.full([ROWS], 0, tl.int64)
    if DO_TOPK:
        want = tl.where(top_k > 0, top_k, vocab).to(tl.int64)
        active = row_ok & (want < n_alive)
        lo = tl.where(active, key_lo, KEY_MIN)
        hi = tl.where(active, key_hi, KEY_MIN)
        while tl.max((hi > lo).to(tl.int32), axis=0) > 0:
            mid = lo + ((hi - lo + 1) >> 1)
            count = tl.zeros([ROWS], tl.int64)
            up = tl.full([ROWS], 2147483647, tl.int64)
            down = tl.full([ROWS], KEY_MIN, tl.int64)
            for blk in range(NUM_BLOCKS):
                cols = blk * BLOCK + lane
                mask = row_ok[:, None] & (cols < vocab)
                z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
                at_or_above = alive & (key >= mid[:, None])
                count += tl.sum(at_or_above.to(tl.int64), axis=1)
                up = tl.minimum(up, tl.min(tl.where(at_or_above, key, 2147483647), axis=1))
                down = tl.maximum(down, tl.max(tl.where(alive & (key < mid[:, None]), key, KEY_MIN), axis=1))
            ok = count >= want
            open_ = hi > lo
            lo = tl.where(open_ & ok, up, lo)
            hi = tl.where(open_ & ~ok, down, hi)
        tau_k = lo
        above = tl.zeros([ROWS], tl.int64)
        for blk in range(NUM_BLOCKS):
            cols = blk * BLOCK + lane
            mask = row_ok[:, None] & (cols < vocab)
            z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
            above += tl.sum((alive & (key > tau_k[:, None])).to(tl.int64), axis=1)
        need = want - above
        cut_k = tl.full([ROWS], 2147483647, tl.int64)
        seen = tl.zeros([ROWS], tl.int64)
        for blk in range(NUM_BLOCKS):
            cols = blk * BLOCK + lane
            mask = row_ok[:, None] & (cols < vocab)
            z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
            tie = alive & (key == tau_k[:, None])
            rank = tl.cumsum(tie.to(tl.int64), axis=1) + seen[:, None]
            last = tl.min(tl.where(tie & (rank == need[:, None]), cols.to(tl.int64), 2147483647), axis=1)
            cut_k = tl.minimum(cut_k, last + 1)
            seen += tl.sum(tie.to(tl.int64), axis=1)

    # top-p: the largest key τ whose mass F(τ) = Σ e·[key >= τ] over the top-k set reaches p · Z (same
    # snapped bisection), then the index cut-off among ties at τ.
    tau_p = tl.full([ROWS], KEY_MIN, tl.int64)
    cut_p = tl.full([ROWS], 0, tl.int64)
    if DO_TOPP:
        total = tl.zeros([ROWS], tl.float32)
        for blk in range(NUM_BLOCKS):
            cols = blk * BLOCK + lane
            mask = row_ok[:, None] & (cols < vocab)
            z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
            total += tl.sum(tl.where(alive & _in_cut(key, cols, tau_k, cut_k), e, 0.0), axis=1)
        goal = top_p * total
        active = row_ok & (top_p < 1.0)
        lo = tl.where(active, tl.maximum(key_lo, tau_k), KEY_MIN)
        hi = tl.where(active, key_hi, KEY_MIN)
        while tl.max((hi > lo).to(tl.int32), axis=0) > 0:
            mid = lo + ((hi - lo + 1) >> 1)
            mass = tl.zeros([ROWS], tl.float32)
            up = tl.full([ROWS], 2147483647, tl.int64)
            down = tl.full([ROWS], KEY_MIN, tl.int64)
            for blk in range(NUM_BLOCKS):
                cols = blk * BLOCK + lane
                mask = row_ok[:, None] & (cols < vocab)
                z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
                kept = alive & _in_cut(key, cols, tau_k, cut_k)
                at_or_above = kept & (key >= mid[:, None])
                mass += tl.sum(tl.where(at_or_above, e, 0.0), axis=1)
                up = tl.minimum(up, tl.min(tl.where(at_or_above, key, 2147483647), axis=1))
                down = tl.maximum(down, tl.max(tl.where(kept & (key < mid[:, None]), key, KEY_MIN), axis=1))
            ok = mass >= goal
            open_ = hi > lo
            lo = tl.where(open_ & ok, up, lo)
            hi = tl.where(open_ & ~ok, down, hi)
        tau_p = lo
        above = tl.zeros([ROWS], tl.float32)
        for blk in range(NUM_BLOCKS):
            cols = blk * BLOCK + lane
            mask = row_ok[:, None] & (cols < vocab)
            z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
            above += tl.sum(tl.where(alive & _in_cut(key, cols, tau_k, cut_k) & (key > tau_p[:, None]), e, 0.0),
                            axis=1)
        cut_p = tl.full([ROWS], 2147483647, tl.int64)
        seen = tl.zeros([ROWS], tl.float32)
        for blk in range(NUM_BLOCKS):
            cols = blk * BLOCK + lane
            mask = row_ok[:, None] & (cols < vocab)
            z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
            tie_e = tl.where(alive & _in_cut(key, cols, tau_k, cut_k) & (key == tau_p[:, None]), e, 0.0)
            before = tl.cumsum(tie_e, axis=1) - tie_e + seen[:, None]
            stop = (tie_e > 0) & (above[:, None] + before >= goal[:, None])
            cut_p = tl.minimum(cut_p, tl.min(tl.where(stop, cols.to(tl.int64), 2147483647), axis=1))
            seen += tl.sum(tie_e, axis=1)

    # Draw: index-order inverse CDF over the kept weights (float64 running sum); greedy rows: first argmax.
    kept_total = tl.zeros([ROWS], tl.float64)
    for blk in range(NUM_BLOCKS):
        cols = blk * BLOCK + lane
        mask = row_ok[:, None] & (cols < vocab)
        z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
        w = tl.where(alive & _in_cut(key, cols, tau_k, cut_k) & _in_cut(key, cols, tau_p, cut_p), e, 0.0)
        kept_total += tl.sum(w.to(tl.float64), axis=1)
    target = u * kept_total
    token = tl.full([ROWS], 2147483647, tl.int64)
    last = tl.full([ROWS], -1, tl.int64)
    first_max = tl.full([ROWS], 2147483647, tl.int64)
    run = tl.zeros([ROWS], tl.float64)
    for blk in range(NUM_BLOCKS):
        cols = blk * BLOCK + lane
        mask = row_ok[:, None] & (cols < vocab)
        z, key, alive, e = _state(z_ptr, base + cols, mask, z_reg, m, min_p, SINGLE, DO_MINP)
        w = tl.where(alive & _in_cut(key, cols, tau_k, cut_k) & _in_cut(key, cols, tau_p, cut_p), e, 0.0)
        cum = tl.cumsum(w.to(tl.float64), axis=1) + run[:, None]
        col64 = cols.to(tl.int64)
        token = tl.minimum(token, tl.min(tl.where((cum > target[:, None]) & (w > 0), col64, 2147483647), axis=1))
        last = tl.maximum(last, tl.max(tl.where(w > 0, col64, -1), axis=1))
        first_max = tl.minimum(first_max, tl.min(tl.where(mask & (z == m[:, None]), col64, 2147483647), axis=1))
        run += tl.sum(w.to(tl.float64), axis=1)
    token = tl.where(token == 2147483647, last, token)
    token = tl.where(greedy, first_max, token)
    tl.store(out_ptr + rows, token, mask=row_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(rows: int, vocab: int) -> tuple[int, int, int]:
    """``(ROWS, BLOCK, NUM_BLOCKS)``: blocks of up to 4096 columns; several rows per program when small.

    Under the interpreter a program takes up to 65,536 tile elements: numpy runs each op on the whole tile,
    and the cost is per op, not per element.
    """
    block = min(_next_pow2(vocab), 4096)
    per_program = max(1, min(_next_pow2(rows), (1 << 16 if INTERPRET else 4096) // block))
    return per_program, block, -(-vocab // block)


def sample_triton(
    logits: Tensor,
    params: SamplingParams,
    uniforms: Tensor,
    uncond_logits: Tensor | None = None,
) -> Tensor:
    """Draw one index per row of ``logits: [B, V]`` given ``uniforms: [B]`` float64 → ``[B]`` long.

    Inputs are assumed checked. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    b, v = logits.shape
    temperature, top_k, top_p, min_p = row_params(params, b, logits.device)
    rows, block, num_blocks = launch_config(b, v)
    cond = logits.contiguous()
    guided = uncond_logits is not None and params.guidance_scale != 1.0
    uncond = uncond_logits.contiguous() if guided else cond
    scratch = torch.empty(b if num_blocks > 1 else 1, v if num_blocks > 1 else 1, dtype=torch.float32,
                          device=logits.device)
    out = torch.empty(b, dtype=torch.long, device=logits.device)
    _sample_kernel[(triton.cdiv(b, rows),)](
        cond, uncond, scratch, temperature.contiguous(), top_k.contiguous(), top_p.contiguous(),
        min_p.contiguous(), uniforms.to(torch.float64).contiguous(), out,
        b, v, float(torch.tensor(params.guidance_scale, dtype=torch.float32)),  # the float32 torch uses
        HAS_UNCOND=guided, EXACT_FMA=not INTERPRET, ROWS=rows, BLOCK=block, NUM_BLOCKS=num_blocks,
        DO_TOPK=bool(((top_k > 0) & (top_k < v)).any()), DO_TOPP=bool((top_p < 1).any()),
        DO_MINP=bool((min_p > 0).any()),
    )
    return out
