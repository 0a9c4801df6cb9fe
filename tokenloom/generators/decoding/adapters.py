"""Targets (``base.OrderedTarget`` / ``base.GridTarget``) over tokenloom's generators.

* :class:`RasterTarget`: :class:`~tokenloom.generators.raster_ar.RasterAR` through its KV cache (``prefill``,
  ``step`` with several tokens, ``KVCache.truncate`` to roll back rejected drafts).
* :class:`RandomOrderTarget`: :class:`~tokenloom.generators.random_order.RandomOrderAR` in one fixed order per row
  (random, raster or given), through the model's full (uncached) pass ``hidden``: each feed recomputes the committed
  prefix. RandAR's cache keeps its parallel-decoding layout (pending queries), which has no rollback of committed
  tokens; an uncached pass is exact and simple, and costs ``O(L)`` more compute per pass on long sequences.
* :class:`RasterGridTarget` (ZipAR): RasterAR fed out of raster order through ``RasterAR.step_at`` (explicit grid
  cells and mask). The key of cell ``i`` is visible to a query at cell ``j`` iff ``i < j`` (raster-causal, whatever
  order they entered the cache in), so a query sees exactly the decoded cells before it. The query for a row's first
  cell sits on the previous row's last cell; when that cell is not decoded yet, ZipAR feeds an *auxiliary* input
  there — the most recent decoded token of the previous row — visible to its own query only and dropped after the
  pass (ZipAR's LlamaGen code does the same).

Guidance: the null-condition rows are appended (``2B`` rows), as the generators' own decoding does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import with_key_padding
from tokenloom.generators.random_order_layers import generation_orders
from tokenloom.tokens import Grid, Tokens


class _ModelTarget:
    """Shared set-up: condition, guidance rows, pass counter."""

    def __init__(self, model, cond, params: SamplingParams):
        self.model = model
        self.cond = model.as_condition(cond)
        self.batch_size = self.cond.batch_size
        self.params = params
        self.guided = params.uses_guidance
        if self.guided and model.condition_kind == "none":
            raise ValueError(f"guidance needs a conditional generator; this one has condition='none' "
                             f"(guidance_scale={params.guidance_scale})")
        spec = model.spec
        self.length, self.vocab_size = spec.length, spec.vocab_size
        self.grid = spec.layout if isinstance(spec.layout, Grid) else None
        self.device = model.device
        self.passes = 0

    def _twice(self, t: Tensor) -> Tensor:
        return torch.cat([t, t]) if self.guided else t

    def _logits(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """``z: [B', T, C]`` → cond logits ``[B, T, V]`` and uncond logits (guided) or None."""
        logits = self.model.output_head.logits(z.flatten(0, 1))[:, 0].unflatten(0, z.shape[:2])
        b = self.batch_size
        return logits[:b], (logits[b:] if self.guided else None)


class RasterTarget(_ModelTarget):
    """RasterAR as an :class:`~tokenloom.generators.decoding.base.OrderedTarget` (order = raster)."""

    def __init__(self, model, cond, params: SamplingParams):
        super().__init__(model, cond, params)
        self.cells = torch.arange(self.length, device=self.device).expand(self.batch_size, -1)
        self.cache: KVCache | None = None

    def begin(self):
        prefix = self.model.embed_prefix(self.cond, self.guided, drop=False)
        self.cache = self.model.new_cache(prefix.x.shape[0])
        z = self.model.prefill(prefix, self.cache)  # [B', C]
        self.passes += 1
        return self._logits(z[:, None])

    def feed(self, tokens: Tensor, start: int):
        p = self.model.prefix_length
        if self.cache.length != p + start:
            raise RuntimeError(f"feed at position {start} but the cache holds {self.cache.length - p} inputs")
        z = self.model.step(self._twice(tokens), self.cache)
        self.passes += 1
        return self._logits(z)

    def truncate(self, n: int) -> None:
        self.cache.truncate(self.model.prefix_length + n)

    def finish(self, tokens: Tensor) -> Tokens:
        return Tokens(tokens[..., None], self.model.spec)


class RandomOrderTarget(_ModelTarget):
    """RandomOrderAR in a fixed order per row (``order``: ``"random"``, ``"raster"`` or ``[B, L]``)."""

    def __init__(self, model, cond, params: SamplingParams, generator=None, order=None):
        super().__init__(model, cond, params)
        b, length = self.batch_size, self.length
        order = model.config.inference_order if order is None else order
        if isinstance(order, Tensor):
            self.cells = model._check_orders(order, b)
        elif order in ("random", "raster"):
            self.cells = generation_orders(generator, b, length, self.device, order == "random")
        else:
            raise ValueError(f"order must be 'random', 'raster' or a [B, L] tensor, got {order!r}")
        self.fed = torch.zeros(b, length, dtype=torch.long, device=self.device)
        self.prefix = None

    def _pass(self, n: int):
        """Logits of order positions ``0..n`` given the inputs at positions ``< n``."""
        cells = self._twice(self.cells[:, :n])
        values = self._twice(self.fed[:, :n])[..., None]
        queries = self._twice(self.cells[:, n:n + 1])
        z = self.model.hidden(self.prefix, cells, values, queries)
        self.passes += 1
        return self._logits(z)

    def begin(self):
        self.prefix = self.model.embed_prefix(self.cond, self.guided, drop=False)
        return self._pass(0)

    def feed(self, tokens: Tensor, start: int):
        t = tokens.shape[1]
        self.fed[:, start:start + t] = tokens
        cond, uncond = self._pass(start + t)
        return cond[:, start + 1:], (None if uncond is None else uncond[:, start + 1:])

    def truncate(self, n: int) -> None:
        pass  # the state is ``fed``; positions >= n are overwritten before they are read again

    def finish(self, tokens: Tensor) -> Tokens:
        out = torch.empty_like(tokens).scatter_(1, self.cells, tokens)
        return Tokens(out[..., None], self.model.spec)


class RasterGridTarget(_ModelTarget):
    """RasterAR as a :class:`~tokenloom.generators.decoding.base.GridTarget` (ZipAR)."""

    def __init__(self, model, cond, params: SamplingParams):
        super().__init__(model, cond, params)
        if self.grid is None:
            raise ValueError(f"ZipAR needs a Grid layout, got {model.spec.layout}")
        self.cache: KVCache | None = None
        self.fed = torch.zeros(self.length, dtype=torch.bool)
        self.slot_cells = torch.zeros(0, dtype=torch.long)  # cells of the token inputs in the cache, in cache order

    def begin(self):
        prefix = self.model.embed_prefix(self.cond, self.guided, drop=False)
        self.cache = self.model.new_cache(prefix.x.shape[0])
        z = self.model.prefill(prefix, self.cache)
        self.passes += 1
        return self._logits(z[:, None])

    def predict(self, targets: list[int], codes: Tensor, decoded: Tensor):
        """Logits ``[B, T, V]`` of cells ``targets`` (each ``>= 1``) given the ``decoded`` (``[L]`` bool) ``codes``."""
        w = self.grid.w
        real = [int(c) for c in torch.nonzero(decoded & ~self.fed).flatten()]
        cells, values, query = list(real), [codes[:, c] for c in real], []
        n_real = len(real)
        for p in targets:
            prev = p - 1
            if prev in real:
                query.append(real.index(prev))
                continue
            if bool(decoded[prev]):
                value = codes[:, prev]
            else:  # a row start while the previous row is unfinished: ZipAR's auxiliary input
                row_cells = torch.nonzero(decoded[(p // w - 1) * w:p]).flatten()
                value = codes[:, (p // w - 1) * w + int(row_cells.max())]
            cells.append(prev)
            values.append(value)
            query.append(len(cells) - 1)
        cells_t = torch.tensor(cells, dtype=torch.long)
        old = self.slot_cells
        t, s_old, pre = len(cells), old.numel(), self.model.prefix_length
        key_cells = torch.cat([old, cells_t])
        mask = torch.ones(t, pre + s_old + t, dtype=torch.bool)
        mask[:, pre:] = key_cells[None, :] < cells_t[:, None]
        mask[:, pre + s_old + n_real:] = False  # auxiliary/duplicate inputs: seen by their own query only
        mask[torch.arange(t), pre + s_old + torch.arange(t)] = True
        mask = mask.to(self.device)
        if self.cache.key_valid is not None:
            mask = with_key_padding(mask, self.cache.key_valid[:, :pre + s_old + t])
        z = self.model.step_at(self._twice(torch.stack(values, dim=1)), cells_t.to(self.device), self.cache, mask)
        self.passes += 1
        self.cache.truncate(self.cache.length - (t - n_real))  # drop the auxiliary inputs
        self.fed[real] = True
        self.slot_cells = torch.cat([old, cells_t[:n_real]])
        return self._logits(z[:, query])

    def finish(self, codes: Tensor) -> Tokens:
        return Tokens(codes[..., None], self.model.spec)
