"""How :class:`~tokenloom.generators.random_order.RandomOrderAR` builds its input sequence from positions and tokens.

RandAR (``order_signal="instruction"``): committed tokens are interleaved with their position-instruction tokens,
``[I(o_1), x(o_1), I(o_2), x(o_2), ...]``, then the query instructions; ``I(p)`` and ``x(p)`` both take the RoPE of
cell ``p``. RAR (``order_signal="target_aware"``): each input adds the target-aware embedding of the position it
predicts next. A mixin of ``RandomOrderAR`` (it reads the model's modules and config), with the checks of the
positions (``cells``, ``queries``) and token values handed to the full and the cached passes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.generators.layers.prefix import Prefix
from tokenloom.generators.layers.rope import apply_rope
from tokenloom.generators.random_order_layers import interleave


class RandomOrderInputs:
    """Embeddings, RoPE rows and input checks of :class:`~tokenloom.generators.random_order.RandomOrderAR`."""

    def embed_values(self, values: Tensor) -> Tensor:
        """Token values ``[B, T, channels]`` (the spec's dtype) → ``[B, T, C]``."""
        kind = self.spec.kind
        if kind == "index":
            return self.tok_embeddings(values.long() + self.code_offsets).sum(-2)
        if kind == "bits":
            return self.tok_embeddings(values.to(self.dtype) * 2 - 1)
        return self.tok_embeddings(values.to(self.dtype))

    def _rope_rows(self, cells: Tensor) -> Tensor:
        """RoPE rows ``[B, T, D/2, 2]`` of grid cells ``[B, T]``."""
        return self.rope_table[self.prefix_length + cells]

    def embed_instructions(self, cells: Tensor) -> Tensor:
        """Position-instruction tokens ``[B, T, C]`` for target cells ``[B, T]``."""
        if self.config.instruction_embedding == "learned":
            return self.instruction_embeddings(cells)
        attn = self.layers[0].attention
        b, t = cells.shape
        shared = self.pos_instruct_embeddings.view(1, 1, attn.num_heads, attn.head_dim).expand(b, t, -1, -1)
        return apply_rope(shared, self._rope_rows(cells)).flatten(2)

    def _chunk(self, cells: Tensor, values: Tensor, queries: Tensor, skip_first: bool = False,
               prefix: Prefix | None = None) -> tuple[Tensor, Tensor]:
        """Inputs ``[B, T', C]`` and RoPE rows ``[B, T', D/2, 2]`` of committed tokens and queries (see the docstring).

        ``cells, values``: the committed tokens, in order; ``queries: [B, Q]`` cells to predict next. ``skip_first``:
        the instruction of ``cells[:, 0]`` is already in the cache. ``prefix``: put it in front (target-aware: its
        last token carries the first target's embedding).
        """
        b = cells.shape[0]
        tokens = self.embed_values(values)
        if self.uses_instructions:
            x = interleave(self.embed_instructions(cells), tokens)
            rows_cells = interleave(cells, cells)
            if skip_first:
                x, rows_cells = x[:, 1:], rows_cells[:, 1:]
            x = torch.cat([x, self.embed_instructions(queries)], dim=1)
            rows_cells = torch.cat([rows_cells, queries], dim=1)
            rope = self._rope_rows(rows_cells)
        else:
            # targets[j]: what the j-th input predicts, counting the last prefix token as input 0; token i of the
            # chunk predicts targets[i + 1] (none for the very last token when there is no query: zero embedding)
            targets = torch.cat([cells, queries], dim=1)
            tae = self.target_aware_embeddings(targets)
            tae = torch.cat([tae, torch.zeros_like(tae[:, :1])], dim=1)
            x = tokens + tae[:, 1:1 + cells.shape[1]]
            rope = self._rope_rows(cells)
        if prefix is not None:
            head = prefix.x
            if not self.uses_instructions and targets.shape[1]:
                head = torch.cat([head[:, :-1], head[:, -1:] + tae[:, :1]], dim=1)
            x = torch.cat([head, x.to(head.dtype)], dim=1)
            prefix_rows = self.rope_table[:self.prefix_length].expand(b, -1, -1, -1)
            rope = torch.cat([prefix_rows, rope], dim=1)
        return x, rope

    def _check_cells(self, cells, name: str, batch: int | None = None) -> Tensor:
        length = self.spec.length
        if not isinstance(cells, Tensor) or cells.dim() != 2 or cells.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor [B, T] of token positions, got "
                            f"{getattr(cells, 'shape', type(cells).__name__)}")
        if batch is not None and cells.shape[0] != batch:
            raise ValueError(f"{name} must have {batch} rows, got {tuple(cells.shape)}")
        if cells.numel() and (int(cells.min()) < 0 or int(cells.max()) >= length):
            raise ValueError(f"{name} must hold positions in [0, {length - 1}], got range "
                             f"[{int(cells.min())}, {int(cells.max())}]")
        return cells.long().to(self.device)

    def _check_values(self, values, cells: Tensor, name: str = "values") -> Tensor:
        spec = self.spec
        if not isinstance(values, Tensor) or values.shape != (*cells.shape, spec.channels):
            raise ValueError(f"{name} must have shape [{cells.shape[0]}, {cells.shape[1]}, {spec.channels}] (one "
                             f"token per position), got {getattr(values, 'shape', type(values).__name__)}")
        if spec.kind == "continuous":
            if not values.is_floating_point():
                raise TypeError(f"{name} must be a float tensor for continuous tokens, got {values.dtype}")
            return values.to(self.device)
        high = spec.vocab_size if spec.kind == "index" else 2
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= high):
            raise ValueError(f"{name} must lie in [0, {high - 1}] for {spec.kind!r} tokens, got range "
                             f"[{int(values.min())}, {int(values.max())}]")
        return values.long().to(self.device)

    def _check_sequence(self, cells: Tensor, queries: Tensor, committed: int = 0) -> None:
        total = committed + cells.shape[1] + queries.shape[1]
        if total > self.spec.length:
            raise ValueError(f"the layout holds {self.spec.length} tokens; cannot place {total} (committed "
                             f"{committed + cells.shape[1]} + queries {queries.shape[1]})")
        if not self.uses_instructions and queries.shape[1] > 1:
            raise ValueError(f"order_signal='target_aware' (RAR) predicts one token per step; got "
                             f"{queries.shape[1]} queries")

    @property
    def _value_dtype(self) -> torch.dtype:
        return self.dtype if self.spec.kind == "continuous" else torch.long


__all__ = ["RandomOrderInputs"]
