"""KV-cached decoding passes of :class:`~tokenloom.generators.random_order.RandomOrderAR`.

:meth:`RandomOrderCaching.prefill` feeds the prefix, the committed tokens (e.g. known ones) and the first queries into
an empty :class:`RandomOrderCache`; each :meth:`RandomOrderCaching.step` commits the tokens sampled for the pending
queries and feeds the next queries. RandAR drops the re-fed instructions' keys from the cache and writes them again,
interleaved with their tokens (all but the first one's, which already saw exactly that context), so the cache always
holds the training layout. The tests compare this path with the full one (:meth:`RandomOrderAR.hidden`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import causal_mask, with_key_padding
from tokenloom.generators.layers.prefix import Prefix


@dataclass
class RandomOrderCache:
    """A :class:`KVCache` plus the query positions fed last whose tokens are not committed yet.

    ``pending: [B, Q]`` long cells of the query tokens at the end of the cache (None after a step with no queries).
    """

    kv: KVCache
    pending: Tensor | None = None

    @property
    def length(self) -> int:
        return self.kv.length


class RandomOrderCaching:
    """``new_cache``, ``prefill`` and ``step`` of :class:`~tokenloom.generators.random_order.RandomOrderAR`."""

    def new_cache(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> RandomOrderCache:
        """An empty cache for ``batch_size`` rows: ``P + 2L`` positions (``P + L`` for target-aware)."""
        attn = self.layers[0].attention
        per_token_slots = 2 if self.uses_instructions else 1
        kv = KVCache(len(self.layers), batch_size, attn.num_kv_heads,
                     self.prefix_length + per_token_slots * self.spec.length, attn.head_dim,
                     dtype=dtype or self.dtype, device=device or self.device)
        return RandomOrderCache(kv)

    def _cached_pass(self, cache: RandomOrderCache, x: Tensor, rope: Tensor, queries: Tensor) -> Tensor:
        kv, start, t = cache.kv, cache.kv.length, x.shape[1]
        kv.check_room(t)
        mask = None
        if t > 1 or kv.key_valid is not None:
            mask = causal_mask(t, start + t, device=x.device)
            if kv.key_valid is not None:
                mask = with_key_padding(mask, kv.key_valid[:, :start + t])
        out = self._run(x.to(kv.k.dtype), rope, mask, kv)
        cache.pending = queries if queries.shape[1] else None
        return out[:, t - queries.shape[1]:]

    def prefill(self, prefix: Prefix, cache: RandomOrderCache, cells: Tensor | None = None,
                values: Tensor | None = None, queries: Tensor | None = None) -> Tensor:
        """First pass into an empty ``cache``: prefix, committed ``cells``/``values`` (e.g. known tokens), ``queries``.

        Returns ``z: [B, Q, C]`` of the queries (one pass, as RandAR's first step).
        """
        b = prefix.x.shape[0]
        if cache.length != 0 or cache.kv.batch_size != b:
            raise ValueError(f"prefill needs an empty cache of {b} rows, got length={cache.length}, "
                             f"rows={cache.kv.batch_size}")
        cells = torch.zeros(b, 0, dtype=torch.long, device=self.device) if cells is None else cells
        cells = self._check_cells(cells, "cells", b)
        values = (torch.zeros(b, 0, self.spec.channels, device=self.device, dtype=self._value_dtype)
                  if values is None else values)
        values = self._check_values(values, cells)
        queries = cells[:, :0] if queries is None else self._check_cells(queries, "queries", b)
        self._check_sequence(cells, queries)
        x, rope = self._chunk(cells, values, queries, prefix=prefix)
        if prefix.key_valid is not None:
            cache.kv.key_valid = torch.ones(b, cache.kv.max_length, dtype=torch.bool, device=x.device)
            cache.kv.key_valid[:, :self.prefix_length] = prefix.key_valid
        return self._cached_pass(cache, x, rope, queries)

    def step(self, cache: RandomOrderCache, cells: Tensor, values: Tensor, queries: Tensor | None = None) -> Tensor:
        """Commit ``values [B, T, channels]`` at ``cells [B, T]`` and feed ``queries [B, Q]`` → ``z: [B, Q, C]``.

        ``cells`` must start with the cache's pending queries (the positions whose tokens were just sampled); their
        instruction tokens are rewritten in the interleaved training layout (all but the first, whose keys already
        saw exactly that context).
        """
        kv, b = cache.kv, cache.kv.batch_size
        if kv.length == 0:
            raise ValueError("step needs a cache filled by prefill first")
        cells = self._check_cells(cells, "cells", b)
        values = self._check_values(values, cells)
        queries = cells[:, :0] if queries is None else self._check_cells(queries, "queries", b)
        pending = cache.pending
        m = 0 if pending is None else pending.shape[1]
        if m and (cells.shape[1] < m or not torch.equal(cells[:, :m], pending)):
            raise ValueError(f"step must first commit the {m} pending query positions {pending.tolist()}, got cells "
                             f"{cells.tolist()}")
        committed = self._committed(cache) - m
        self._check_sequence(cells, queries, committed)
        if self.uses_instructions and m:
            kv.truncate(kv.length - (m - 1))
        x, rope = self._chunk(cells, values, queries, skip_first=self.uses_instructions and m > 0)
        return self._cached_pass(cache, x, rope, queries)

    def _committed(self, cache: RandomOrderCache) -> int:
        """Tokens in the cache (committed or pending) beyond the prefix."""
        n = cache.length - self.prefix_length
        if not self.uses_instructions:
            return n + (0 if cache.pending is None else cache.pending.shape[1])
        m = 0 if cache.pending is None else cache.pending.shape[1]
        return (n - m) // 2 + m


__all__ = ["RandomOrderCache", "RandomOrderCaching"]
