"""Speculative acceptance: keep a prefix of draft tokens so that the output is distributed as the target.

``speculative_accept(draft_tokens, target_probs, generator, *, draft_probs=None)
-> (num_accepted [B], next_tokens [B])``

For each row, draft token ``x_i`` (position ``i`` of ``W``) is accepted with probability
``min(1, p_i(x_i) / q_i(x_i))``, in order, until the first rejection at position ``n``; the token at
``n`` is then drawn from the residual ``normalise(max(p_n − q_n, 0))``. When all ``W`` drafts are accepted
and ``target_probs`` has a ``W + 1``-th position, the bonus token is drawn from ``p_W``. Rows accept
different numbers of tokens; everything is batched (no loop over rows or positions). This is the
standard exactness argument (Leviathan et al. 2023; Chen et al. 2023): the accepted-then-drawn token at
each position is distributed as ``p``.

* ``draft_probs [B, W, V]``: the distributions the drafts were sampled from. The residual needs ``q``
  at every token, so the draft token's probability alone is not enough.
* ``draft_probs=None``: deterministic drafts (greedy drafts, Jacobi initialisations, look-ups): ``q`` is
  one-hot at the draft, so ``x_i`` is accepted with probability ``p_i(x_i)`` and a rejection draws from
  ``p_i`` without ``x_i``.
* Randomness: ``W + 1`` uniforms per row from :func:`row_uniforms` (row ``i`` from ``generator[i]`` when
  a list is given): ``W`` for the acceptance tests, one for the index-order inverse-CDF draw.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.kernels.checks import check_generator
from tokenloom.kernels.reference import row_uniforms
from tokenloom.kernels.torch_sampling import draw_dense


@torch.no_grad()
def speculative_accept(
    draft_tokens: Tensor,
    target_probs: Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    *,
    draft_probs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Accept a prefix of each row's drafts and draw the token after it.

    Args:
        draft_tokens: ``[B, W]`` long drafts.
        target_probs: ``[B, W, V]`` or ``[B, W + 1, V]`` target probabilities ``p`` at each draft position
            (given the drafts before it), plus optionally the bonus position after the last draft.
        generator: None, one ``torch.Generator`` or a list of ``B``.
        draft_probs: ``[B, W, V]`` draft distributions ``q``, or None for deterministic drafts.

    Returns:
        ``num_accepted [B]`` long in ``[0, W]`` and ``next_tokens [B]`` long: the token at position
        ``num_accepted`` (residual draw after a rejection, bonus draw after full acceptance), or -1 when
        every draft was accepted and ``target_probs`` has no bonus position.
    """
    _check(draft_tokens, target_probs, draft_probs, generator)
    b, w = draft_tokens.shape
    p = target_probs.float()
    uniforms = row_uniforms(generator, b, p.device, per_row=w + 1)
    tokens = draft_tokens.long()
    p_draft = p[:, :w].gather(2, tokens[..., None])[..., 0]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.float().gather(2, tokens[..., None])[..., 0]
    # accept x_i with probability min(1, p/q): U·q < p (no division; q = 0 accepts whenever p > 0).
    accepted = uniforms[:, :w] * q_draft.double() < p_draft.double()
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    rows = torch.arange(b, device=p.device)
    at = num_accepted.clamp(max=w - 1)
    p_at = p[rows, at]
    if draft_probs is None:
        q_at = torch.zeros_like(p_at).scatter_(1, tokens[rows, at][:, None], 1.0)
    else:
        q_at = draft_probs.float()[rows, at]
    residual = (p_at - q_at).clamp(min=0)
    empty = residual.sum(dim=-1) <= 0  # p == q up to rounding: a rejection has probability 0 there
    residual = torch.where(empty[:, None], p_at, residual)
    all_accepted = num_accepted == w
    has_bonus = target_probs.shape[1] == w + 1
    weights = torch.where(all_accepted[:, None], p[:, w] if has_bonus else p_at, residual)
    next_tokens = draw_dense(weights, uniforms[:, w])
    if not has_bonus:
        next_tokens = torch.where(all_accepted, torch.full_like(next_tokens, -1), next_tokens)
    return num_accepted, next_tokens


def _check(draft_tokens: Tensor, target_probs: Tensor, draft_probs: Tensor | None, generator) -> None:
    if not isinstance(draft_tokens, Tensor) or draft_tokens.dim() != 2 or draft_tokens.is_floating_point():
        what = getattr(draft_tokens, "dtype", type(draft_tokens))
        raise ValueError(f"draft_tokens must be an integer tensor [B, W], got {what} "
                         f"{tuple(getattr(draft_tokens, 'shape', ()))}")
    b, w = draft_tokens.shape
    if b == 0 or w == 0:
        raise ValueError(f"draft_tokens must have B, W >= 1, got {tuple(draft_tokens.shape)}")
    if (not isinstance(target_probs, Tensor) or target_probs.dim() != 3 or target_probs.shape[0] != b
            or target_probs.shape[1] not in (w, w + 1)):
        raise ValueError(f"target_probs must have shape [B, W, V] or [B, W + 1, V] with B={b}, W={w}, got "
                         f"{tuple(getattr(target_probs, 'shape', ()))}")
    v = target_probs.shape[2]
    if draft_probs is not None and (not isinstance(draft_probs, Tensor) or draft_probs.shape != (b, w, v)):
        raise ValueError(f"draft_probs must be None or have shape [B, W, V] = {(b, w, v)}, got "
                         f"{tuple(getattr(draft_probs, 'shape', ()))}")
    if int(draft_tokens.min()) < 0 or int(draft_tokens.max()) >= v:
        raise ValueError(f"draft_tokens must lie in [0, {v}), got values in [{int(draft_tokens.min())}, "
                         f"{int(draft_tokens.max())}]")
    for name, t in (("target_probs", target_probs), ("draft_probs", draft_probs)):
        if t is not None and not (torch.isfinite(t).all() and (t >= 0).all()):
            raise ValueError(f"{name} must be finite and >= 0")
    check_generator(generator, b)
