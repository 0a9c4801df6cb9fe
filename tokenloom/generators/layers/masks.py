"""Dense boolean attention masks for ``scaled_dot_product_attention`` (True = may attend).

Every helper returns ``[Lq, Lk]`` bool; callers broadcast to ``[B, H, Lq, Lk]``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(q_len: int, kv_len: int | None = None, device=None) -> Tensor:
    """Queries are the *last* ``q_len`` of ``kv_len`` positions; query ``i`` sees keys ``j <= kv_len - q_len + i``.

    ``kv_len=None`` means ``kv_len = q_len`` (the usual square causal mask). Returns ``[q_len, kv_len]``.
    """
    kv_len = q_len if kv_len is None else kv_len
    if q_len < 1 or kv_len < q_len:
        raise ValueError(f"causal_mask needs 1 <= q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(diagonal=kv_len - q_len)


def prefix_mask(length: int, prefix_len: int, device=None) -> Tensor:
    """Causal over ``length`` positions except that the first ``prefix_len`` see each other fully.

    Returns ``[length, length]``.
    """
    if not 0 <= prefix_len <= length:
        raise ValueError(f"prefix_mask needs 0 <= prefix_len <= length, got prefix_len={prefix_len}, "
                         f"length={length}")
    mask = causal_mask(length, device=device)
    mask[:prefix_len, :prefix_len] = True
    return mask


def block_causal_mask(block_sizes: list[int], device=None) -> Tensor:
    """Position in block ``b`` sees every position of blocks ``0..b`` (VAR, block diffusion).

    Returns ``[L, L]`` with ``L = sum(block_sizes)``.
    """
    if not block_sizes or any(int(s) < 1 for s in block_sizes):
        raise ValueError(f"block_sizes must be a non-empty list of positive ints, got {block_sizes!r}")
    block = torch.repeat_interleave(torch.arange(len(block_sizes), device=device),
                                    torch.tensor([int(s) for s in block_sizes], device=device))
    return block[:, None] >= block[None, :]


def with_key_padding(mask: Tensor, key_valid: Tensor | None) -> Tensor:
    """Combine ``mask: [Lq, Lk]`` with ``key_valid: [B, Lk]`` (False = padding) → ``[B, 1, Lq, Lk]``.

    A query at absolute position ``Lk - Lq + i`` always keeps itself, so no row is empty (an all-masked row
    would give NaN and poison later layers through the cache).
    """
    if key_valid is None:
        return mask
    q_len, kv_len = mask.shape
    self_key = torch.zeros_like(mask)
    self_key[torch.arange(q_len), torch.arange(kv_len - q_len, kv_len)] = True
    return (mask & key_valid[:, None, None, :]) | self_key
