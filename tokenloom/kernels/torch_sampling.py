"""Fast torch sampler for CPUs (and any device without Triton): same contract as ``reference.py``.

Why our own code: no library samples with per-row top-k/top-p/min-p, guidance and an order-independent
draw without sorting the vocabulary. The reference sorts every row (``O(V log V)``); this path never
sorts the vocabulary, and touches all ``V`` logits only in a few streaming passes:

* **candidates** (rows with top-k): the ``k + 1`` best tokens, unordered, by a two-level selection —
  column maxima over ``g ≈ √(V/k)`` strided groups (one reduction), ``topk`` over those maxima, ``topk``
  over the ``g·(k+1)`` members of the winning columns. Every top-``(k+1)`` token lies in a winning column
  (its column's maximum is at least its own value), so the set is exact; the extra token detects ties at
  the boundary, and tied rows are re-ranked exactly with an ``int64`` key ``(z, −index)``.
* **thresholds** instead of an ordered candidate list: only the candidate *values* are sorted (numpy's
  sort on CPU, ~6× ATen's here), min-p → top-k → top-p run on them in rank order and give the kept count
  ``r``; the kept tokens are the candidates ``>= value[r − 1]`` — exact unless another candidate ties
  that value (then that row is put in exact rank order). Rows without top-p sharing one ``k`` skip the
  sort.
* **top-p without top-k**: one ``exp`` pass for the total mass, then candidates of a guessed count that
  grows ×8 until they hold the top-p set.
* **draw**: inverse CDF in vocabulary index order (the contract) in two levels — block sums of 64 indices
  by ``scatter_add`` of the kept candidates, then one dense block — instead of ``torch.multinomial`` or a
  cumulative sum over the vocabulary. Sums are float64, so the token matches the reference's except when
  two float64 summation orders round across ``U · total`` (probability ~1e-16 per draw).

``compile=True`` runs the per-candidate stages (filter and draw) through ``torch.compile``: Inductor fuses
their ~50 small ops into a few C++ loops, but ``topk`` and the sorts — where the time goes — stay ATen
calls, so it gains ~10% at best (``benchmarks/sampling.py``). It is opt-in and lazy: the first call
compiles for ~40 s here, and scalar params are compiled in as constants (a new value recompiles).

Big temporaries live in per-thread buffers reused across calls: a fresh multi-MB CPU tensor is
``mmap``-ed and page-faulted on every call, which here costs more than the arithmetic on it.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels.reference import guided_logits

DRAW_BLOCK = 64  # indices per block of the two-level index-order draw
TOP_P_GUESS = 1024  # first candidate count for rows with top-p but no top-k
GROWTH = 8  # candidate count growth when the guess does not hold the top-p set


def sample_torch(
    logits: Tensor,
    params: SamplingParams,
    uniforms: Tensor,
    uncond_logits: Tensor | None = None,
    *,
    compile: bool = False,
) -> Tensor:
    """Draw one index per row of ``logits: [B, V]`` given ``uniforms: [B]`` float64 → ``[B]`` long.

    Inputs are assumed checked (:func:`tokenloom.kernels.checks.check_sample_inputs`). Scalar params stay
    Python numbers (a step that is off costs nothing); per-row params are ``[B]`` tensors.
    """
    b, v = logits.shape
    device = logits.device
    temperature, top_k, top_p, min_p = (
        _row_param(params.temperature, device, torch.float32), _row_param(params.top_k, device, torch.long),
        _row_param(params.top_p, device, torch.float32), _row_param(params.min_p, device, torch.float32))
    x = _guided(logits, uncond_logits, params.guidance_scale).contiguous()
    greedy = temperature == 0
    ranked = (top_k > 0) | (top_p < 1)
    if not isinstance(greedy, Tensor) and not isinstance(ranked, Tensor):  # one group of rows
        if greedy:
            return x.argmax(dim=-1)
        return (_sample_ranked if ranked else _sample_dense)(x, temperature, top_k, top_p, min_p, uniforms, compile)
    greedy, ranked = torch.as_tensor(greedy, device=device).expand(b), torch.as_tensor(ranked, device=device).expand(b)
    tokens = torch.empty(b, dtype=torch.long, device=device)
    for rows, fn in ((ranked & ~greedy, _sample_ranked), (~ranked & ~greedy, _sample_dense)):
        if bool(rows.all()):
            return fn(x, temperature, top_k, top_p, min_p, uniforms, compile)
        if bool(rows.any()):
            idx = rows.nonzero()[:, 0]
            tokens[idx] = fn(x[idx], *(_rows(p, idx) for p in (temperature, top_k, top_p, min_p)), uniforms[idx],
                             compile)
    if bool(greedy.any()):
        idx = greedy.nonzero()[:, 0]
        tokens[idx] = x[idx].argmax(dim=-1)
    return tokens


def _row_param(value, device, dtype):
    """A per-row tensor parameter on ``device``, or a Python number as it is."""
    return value.to(device=device, dtype=dtype) if isinstance(value, Tensor) else value


def _rows(value, idx: Tensor):
    return value[idx] if isinstance(value, Tensor) else value


def _col(value):
    """``[B, 1]`` for broadcasting against ``[B, N]``; Python numbers broadcast as they are."""
    return value[:, None] if isinstance(value, Tensor) else value


def _any(condition) -> bool:
    return bool(condition.any()) if isinstance(condition, Tensor) else bool(condition)


def _all(condition) -> bool:
    return bool(condition.all()) if isinstance(condition, Tensor) else bool(condition)


_LOCAL = threading.local()


def _buffer(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A per-thread scratch tensor reused across calls. Fresh multi-MB CPU tensors are ``mmap``-ed and
    page-faulted on every call (measured here: ~0.8 ms per 2 MB, more than the arithmetic)."""
    buffers = _LOCAL.__dict__.setdefault("buffers", {})
    t = buffers.get(name)
    if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
        t = buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return t


def _guided(logits: Tensor, uncond_logits: Tensor | None, scale: float) -> Tensor:
    """:func:`guided_logits` (same arithmetic) written into a reused buffer; the buffer is private to
    one call of :func:`sample_torch`."""
    if uncond_logits is None or scale == 1.0 or logits.dtype != torch.float32 or uncond_logits.dtype != torch.float32:
        return guided_logits(logits, uncond_logits, scale)
    x = torch.sub(logits, uncond_logits, out=_buffer("guided", tuple(logits.shape), logits))
    return torch.add(uncond_logits, x, alpha=scale, out=x)


def _tempered(x: Tensor, temperature) -> Tensor:
    """``z = x / T`` (``T > 0`` here); no pass over ``x`` when every T is 1."""
    return x if _all(temperature == 1) else x / _col(temperature)


def _sample_dense(x: Tensor, temperature, top_k, top_p, min_p, uniforms: Tensor, compile: bool) -> Tensor:
    """Rows without top-k/top-p: weights ``exp(z − max)`` (min-p applied) and the two-level draw."""
    z = _tempered(x, temperature)
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    if _any(min_p > 0):
        e = torch.where(e >= _col(min_p), e, 0.0)
    return draw_dense(e, uniforms)


def _sample_ranked(x: Tensor, temperature, top_k, top_p, min_p, uniforms: Tensor, compile: bool) -> Tensor:
    """Rows with top-k and/or top-p: work on the best-ranked candidates only."""
    b, v = x.shape
    full_mass = None
    if _any(top_k == 0):
        # Top-p without top-k needs the mass of every min-p survivor: one exp pass (float64 sum).
        z = _tempered(x, temperature)
        e = torch.exp(z - z.amax(dim=-1, keepdim=True))
        if _any(min_p > 0):
            e = torch.where(e >= _col(min_p), e, 0.0)
        full_mass = e.sum(dim=-1, dtype=torch.float64).float()
    kmax = int(top_k.max()) if isinstance(top_k, Tensor) else top_k
    count = kmax if full_mass is None else min(v, max(kmax, TOP_P_GUESS))
    shared_k = full_mass is None and _all(top_k == kmax) and not _any(top_p < 1)
    filter_fn = _filter_compiled() if compile else filter_candidates
    while True:
        values, indices, ordered, kth = top_candidates(x, temperature, count)
        sorted_values = None if shared_k and values.shape[1] < v else sort_descending(values)
        weights, holds, cut_tied = filter_fn(values, ordered, kth, sorted_values, top_k, top_p, min_p, full_mass)
        if bool(cut_tied.any()):  # a tie straddles the top-p cut: put those rows in exact rank order
            values, indices, ordered = rank_order(values, indices, ordered, cut_tied, v)
            weights, holds, _ = filter_fn(values, ordered, kth, sorted_values, top_k, top_p, min_p, full_mass)
        if count >= v or bool(holds.all()):
            return (_draw_compiled() if compile else draw_candidates)(indices, weights, uniforms, v)
        count = min(v, count * GROWTH)


def filter_candidates(values: Tensor, ordered: Tensor, kth: Tensor, sorted_values: Tensor | None, top_k, top_p,
                      min_p, full_mass: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """min-p → top-k → top-p on the candidates of each row.

    Args:
        values: ``[B, C]`` candidate tempered logits: unordered, or in rank order where ``ordered [B]``.
        kth: ``[B]`` the value at rank ``C − 2`` (used when ``sorted_values`` is None: every row's top-k
            is ``C − 1``, and the extra candidate only marks the boundary).
        sorted_values: ``[B, C]`` the values sorted descending, or None (one shared k, no top-p).
        top_k, top_p, min_p: ``[B]`` tensors or Python numbers; top_k 0 = off (top-p alone, then
            ``full_mass`` is needed).
        full_mass: ``[B]`` mass of the min-p survivors over the whole row (rows with top_k 0), or None.

    Returns:
        ``weights [B, C]`` (``exp(z − max)`` on kept candidates, else 0); ``holds [B]``: whether the
        candidates provably hold every kept token (always true for rows with a top-k); ``cut_tied [B]``:
        unordered rows where a candidate outside the kept set ties the last kept value (the value cut
        cannot separate them: put those rows in rank order and filter again). Ties anywhere else do not
        matter: equal values have equal weights, so the rank-order masses do not depend on their order.
    """
    rank = torch.arange(values.shape[1], device=values.device)
    holds = torch.ones_like(ordered)
    if sorted_values is None:
        e = torch.exp(values - values.amax(dim=-1, keepdim=True))
        keep = torch.where(ordered[:, None], rank < _col(top_k), values >= kth[:, None])
        if _any(min_p > 0):
            keep &= e >= _col(min_p)
        return torch.where(keep, e, 0.0), holds, torch.zeros_like(ordered)
    row_max = sorted_values[:, :1]
    e = torch.exp(values - row_max)
    es = torch.exp(sorted_values - row_max)
    p_only = top_k == 0
    in_k = (rank < _col(top_k)) | _col(p_only)
    if _any(min_p > 0):
        in_k = in_k & (es >= _col(min_p))
    ws = torch.where(in_k, es, 0.0)
    cum = torch.cumsum(ws, dim=-1)
    mass = cum[:, -1]
    if full_mass is not None:
        holds = mass >= top_p * full_mass
        if isinstance(p_only, Tensor):
            holds, mass = holds | ~p_only, torch.where(p_only, full_mass, mass)
        else:  # every row is top-p alone
            mass = full_mass
    in_p = cum - ws < _col(top_p) * mass[:, None]
    if _any(top_p >= 1):  # 1.0 = off
        in_p = in_p | _col(top_p >= 1)
    kept = ((ws > 0) & in_p).sum(dim=-1, keepdim=True)
    around = sorted_values.gather(1, torch.cat([kept - 1, kept.clamp(max=values.shape[1] - 1)], dim=1))
    cut_tied = ~ordered & (kept[:, 0] < values.shape[1]) & (around[:, 0] == around[:, 1])
    keep = torch.where(ordered[:, None], rank < kept, values >= around[:, :1])
    if _any(min_p > 0):
        keep &= e >= _col(min_p)
    return torch.where(keep, e, 0.0), holds, cut_tied


def top_candidates(x: Tensor, temperature, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``count + 1`` best-ranked tokens of each row (an exact set, ties broken by lower index).

    Selection runs on the guided logits ``x: [B, V]`` and only the candidates are divided by the
    temperature (division keeps the order); a tie at the boundary *after* division is detected on the
    candidates and such rows are recomputed exactly.

    Returns ``values [B, C]`` (tempered), ``indices [B, C]`` with ``C = min(count + 1, V)`` — unordered,
    except rows flagged in ``ordered [B]`` (exact rank order) — and ``kth [B]``, the value at rank
    ``count − 1``.
    """
    b, v = x.shape
    unit = _all(temperature == 1)
    if count + 1 >= v:
        z = _tempered(x, temperature)
        values, indices = torch.sort(z, dim=-1, descending=True, stable=True)
        return values, indices, torch.ones(b, dtype=torch.bool, device=x.device), values[:, min(count, v) - 1]
    take = count + 1
    groups = math.isqrt(v // take)  # minimises the selected-from count v / g + g · take
    if groups >= 2 and v % groups == 0 and v // groups + groups * take < 0.7 * v:
        width = v // groups
        columns_x = x.view(b, groups, width)
        column_max = torch.amax(columns_x, dim=1, out=_buffer("column_max", (b, width), x))
        columns = torch.topk(column_max, take, dim=-1, sorted=False).indices
        members = torch.gather(columns_x, 2, columns[:, None, :].expand(b, groups, take),
                               out=_buffer("members", (b, groups, take), x)).view(b, groups * take)
        values, pos = torch.topk(members, take, dim=-1, sorted=False)
        indices = torch.div(pos, take, rounding_mode="floor") * width + columns.gather(1, pos % take)
    else:
        values, indices = torch.topk(x, take, dim=-1, sorted=False)
    if not unit:
        values = values / _col(temperature)
    lowest2 = torch.topk(values, 2, dim=-1, largest=False).values
    kth = lowest2[:, 1]
    tied = lowest2[:, 0] == kth
    ordered = torch.zeros(b, dtype=torch.bool, device=x.device)
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        z = _tempered(x[rows], _rows(temperature, rows))
        exact = torch.topk(order_key(z), take, dim=-1).indices
        values, indices, kth = values.clone(), indices.clone(), kth.clone()
        indices[rows] = exact
        values[rows] = z.gather(1, exact)
        kth[rows] = values[rows, count - 1]
        ordered[rows] = True
    return values, indices, ordered, kth


def rank_order(values: Tensor, indices: Tensor, ordered: Tensor, rows: Tensor, vocab: int):
    """Put the candidates of ``rows [B]`` (bool) in exact rank order (``z`` descending, lower index first).

    Returns ``values, indices, ordered`` updated for those rows.
    """
    rows = rows.nonzero()[:, 0]
    key = order_key(values[rows], indices[rows], vocab)
    perm = torch.sort(key, dim=-1, descending=True).indices
    values, indices, ordered = values.clone(), indices.clone(), ordered.clone()
    values[rows] = values[rows].gather(1, perm)
    indices[rows] = indices[rows].gather(1, perm)
    ordered[rows] = True
    return values, indices, ordered


def sort_descending(values: Tensor) -> Tensor:
    """Values sorted descending along the last dim (numpy's SIMD sort on CPU, ~6× ATen's here)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy(), axis=-1)).flip(-1)
    return torch.sort(values, dim=-1, descending=True).values


def order_key(z: Tensor, indices: Tensor | None = None, vocab: int | None = None) -> Tensor:
    """``int64`` keys ordered as the rank: ``z`` descending, then lower index first.

    ``z: [B, N]``; ``indices`` (default ``arange(N)``) are the vocabulary indices of the columns.
    """
    bits = (z + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    if indices is None:
        indices, vocab = torch.arange(z.shape[-1], device=z.device), z.shape[-1]
    return (ordered << 32) + (vocab - 1 - indices)


def draw_candidates(indices: Tensor, weights: Tensor, uniforms: Tensor, vocab: int) -> Tensor:
    """Index-order inverse-CDF draw over sparse weights: ``indices, weights: [B, K]`` → ``[B]`` long.

    Level 1: per-block (``DRAW_BLOCK`` indices) sums by ``scatter_add`` and their cumulative sum pick the
    block holding ``U · total``; level 2 scatters that block's candidates into a dense row and scans it.
    """
    b = indices.shape[0]
    nb = -(-vocab // DRAW_BLOCK)
    wd = weights.double()
    block = torch.div(indices, DRAW_BLOCK, rounding_mode="floor")
    block_cum = torch.zeros(b, nb, dtype=torch.float64, device=wd.device).scatter_add_(1, block, wd).cumsum(-1)
    in_block, before, target = _pick_block(block_cum, uniforms)
    mine = (block == in_block[:, None]) & (weights > 0)
    column = torch.where(mine, indices - in_block[:, None] * DRAW_BLOCK, DRAW_BLOCK)
    dense = torch.zeros(b, DRAW_BLOCK + 1, dtype=torch.float64, device=wd.device)
    dense.scatter_(1, column, torch.where(mine, wd, 0.0))
    first = _first_over(before[:, None] + dense[:, :DRAW_BLOCK].cumsum(-1), target)
    last_kept = torch.where(weights > 0, indices, -1).amax(dim=-1)
    return torch.where(first < DRAW_BLOCK, in_block * DRAW_BLOCK + first, last_kept)


def draw_dense(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Index-order inverse-CDF draw over dense ``weights: [B, V]`` → ``[B]`` long (two levels, float64)."""
    b, v = weights.shape
    nb = -(-v // DRAW_BLOCK)
    padded = weights if v == nb * DRAW_BLOCK else torch.nn.functional.pad(weights, (0, nb * DRAW_BLOCK - v))
    blocks = padded.view(b, nb, DRAW_BLOCK)
    block_cum = blocks.sum(dim=-1, dtype=torch.float64).cumsum(-1)
    in_block, before, target = _pick_block(block_cum, uniforms)
    row = blocks.gather(1, in_block[:, None, None].expand(b, 1, DRAW_BLOCK))[:, 0].double()
    first = _first_over(before[:, None] + row.cumsum(-1), target)
    index = torch.arange(v, device=weights.device)
    last_kept = torch.where(weights > 0, index, -1).amax(dim=-1)
    return torch.where(first < DRAW_BLOCK, in_block * DRAW_BLOCK + first, last_kept)


def _pick_block(block_cum: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """First block whose cumulative mass exceeds ``U · total``; mass before it; the target."""
    target = uniforms.to(torch.float64) * block_cum[:, -1]
    in_block = (block_cum <= target[:, None]).sum(dim=-1).clamp(max=block_cum.shape[1] - 1)
    before = torch.where(in_block > 0, block_cum.gather(1, (in_block - 1).clamp(min=0)[:, None])[:, 0], 0.0)
    return in_block, before, target


def _first_over(cum: Tensor, target: Tensor) -> Tensor:
    """First column of ``cum: [B, N]`` above ``target: [B]`` (N if none)."""
    over = cum > target[:, None]
    col = torch.arange(cum.shape[1], device=cum.device)
    return torch.where(over, col, cum.shape[1]).amin(dim=-1)


# ---- opt-in torch.compile variants (built lazily on first use) ----

_COMPILED: dict[str, object] = {}


def _filter_compiled():
    if "filter" not in _COMPILED:
        _COMPILED["filter"] = torch.compile(filter_candidates, dynamic=True)
    return _COMPILED["filter"]


def _draw_compiled():
    if "draw" not in _COMPILED:
        _COMPILED["draw"] = torch.compile(draw_candidates, dynamic=True)
    return _COMPILED["draw"]
