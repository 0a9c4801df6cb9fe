"""A static, preallocated key/value cache for one-token (or few-token) cached decoding.

Buffers are allocated once (``[B, H_kv, T_max, D]`` per layer) and written in place; attention reads the
valid prefix ``[:, :, :length]`` as a view, so nothing is copied per step (no ``repeat_interleave``: when
``H_kv < H`` attention uses ``scaled_dot_product_attention(enable_gqa=True)``). ``truncate`` rolls the cache
back, which speculative decoders need.
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerKV:
    """One layer's view of a :class:`KVCache`."""

    def __init__(self, cache: KVCache, k: Tensor, v: Tensor):
        self.cache, self.k, self.v = cache, k, v

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v: [B, H_kv, T, D]`` at positions ``length..length+T-1``; return all keys/values so far.

        Returns ``([B, H_kv, length+T, D], [B, H_kv, length+T, D])`` views. The cache's ``length`` is moved by
        :meth:`KVCache.advance` once every layer has been updated.
        """
        start = self.cache.length
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Keys and values of ``num_layers`` layers for ``batch_size`` rows and up to ``max_length`` positions."""

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_length: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [LayerKV(self, self.k[i], self.v[i]) for i in range(num_layers)]
        self.max_length = max_length
        self.length = 0
        # [B, max_length] bool, False = a padding key never attended (text prefixes); None = all valid.
        self.key_valid: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def check_room(self, new: int) -> None:
        if self.length + new > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; cannot add {new} to the "
                             f"{self.length} already cached")

    def advance(self, new: int) -> None:
        """Mark ``new`` more positions as written (after all layers were updated)."""
        self.check_room(new)
        self.length += new

    def truncate(self, length: int) -> None:
        """Forget everything from position ``length`` on (speculative decoding rollback)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate length must lie in [0, {self.length}], got {length}")
        self.length = length
