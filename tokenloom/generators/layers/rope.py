"""Rotary position embeddings in LlamaGen's *interleaved* form (adjacent pairs), 1D and 2D.

Our own because checkpoint parity needs LlamaGen's exact conventions (fixtures README §3):

* a head vector of length ``D`` is ``D/2`` adjacent pairs ``(x[2j], x[2j+1])``; pair ``j`` is rotated by
  angle ``a_j``: ``(x0, x1) -> (x0·cos a − x1·sin a, x1·cos a + x0·sin a)``;
* 1D: ``a_j = t · ω_j``, ``ω_j = 1 / base^(2j/D)``, ``j < D/2``;
* 2D, grid cell ``(r, c)``: ``half = D/2``, ``ω_k = 1 / base^(2k/half)``, ``k < half/2``; the first
  ``D/4`` pairs rotate with the row (``r·ω_k``), the last ``D/4`` with the column (``c·ω_k``);
* a table holds ``num_prefix`` rows for prefix (class/text) tokens first: ``"zero"`` gives cos = sin = 0
  as LlamaGen does (the prefix's q and k become zero), ``"identity"`` gives cos = 1, sin = 0.

Tables are ``[P + L, D/2, 2]`` float32 with ``[..., 0] = cos`` and ``[..., 1] = sin``; sequence position
``p`` uses row ``p``.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREFIX_ROPE = ("zero", "identity")


def _frequencies(count: int, denom: int, base: float) -> Tensor:
    """``[count]`` float32: ``1 / base^(2k/denom)`` computed as LlamaGen does (bit-exact)."""
    return 1.0 / (base ** (torch.arange(0, 2 * count, 2)[:count].float() / denom))


def _with_prefix(cells: Tensor, num_prefix: int, prefix: str) -> Tensor:
    """Prepend ``num_prefix`` rows to the ``[L, D/2]`` angle table and return ``[P + L, D/2, 2]``."""
    if prefix not in PREFIX_ROPE:
        raise ValueError(f"prefix rope must be one of {PREFIX_ROPE}, got {prefix!r}")
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be >= 0, got {num_prefix}")
    table = torch.stack([torch.cos(cells), torch.sin(cells)], dim=-1)
    head = torch.zeros(num_prefix, cells.shape[1], 2)
    if prefix == "identity":
        head[..., 0] = 1.0
    return torch.cat([head, table])


def _check_head_dim(head_dim: int, multiple: int) -> None:
    if head_dim <= 0 or head_dim % multiple:
        raise ValueError(f"head_dim must be a positive multiple of {multiple} for this rope, got {head_dim}")


def rope_table_1d(length: int, head_dim: int, base: float = 10000.0, num_prefix: int = 0,
                  prefix: str = "zero") -> Tensor:
    """Table for positions ``0..length-1`` after ``num_prefix`` prefix rows → ``[P + length, D/2, 2]``."""
    _check_head_dim(head_dim, 2)
    freqs = _frequencies(head_dim // 2, head_dim, base)
    return _with_prefix(torch.outer(torch.arange(length), freqs), num_prefix, prefix)


def rope_table_2d(h: int, w: int, head_dim: int, base: float = 10000.0, num_prefix: int = 0,
                  prefix: str = "zero") -> Tensor:
    """Table for an ``h × w`` grid in raster order after ``num_prefix`` rows → ``[P + h·w, D/2, 2]``."""
    _check_head_dim(head_dim, 4)
    half = head_dim // 2
    freqs = _frequencies(half // 2, half, base)
    rows = torch.outer(torch.arange(h), freqs)  # [h, D/4]
    cols = torch.outer(torch.arange(w), freqs)  # [w, D/4]
    cells = torch.cat([rows[:, None, :].expand(h, w, -1), cols[None, :, :].expand(h, w, -1)], dim=-1)
    return _with_prefix(cells.reshape(h * w, half), num_prefix, prefix)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent pairs of ``x: [B, T, H, D]`` by ``table: [T, D/2, 2]`` (or ``[B, T, D/2, 2]``).

    Computed in float32, returned in ``x``'s dtype.
    """
    if table.dim() == 3:
        table = table[None]
    cos, sin = table[..., 0].float()[:, :, None], table[..., 1].float()[:, :, None]  # [B|1, T, 1, D/2]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)
