"""RQ-Transformer's depth transformer: the ``D`` codes of one position, one after another.

An RVQ tokenizer gives ``D`` codes per position (``TokenSpec.depth``). A raster generator's spatial transformer
turns positions ``< t`` into one vector ``h_t``; this small causal transformer then factorises

    p(c_{t,1..D} | h_t) = prod_d p(c_{t,d} | h_t, c_{t,1..d-1})

as RQ-Transformer does (Lee et al. 2022, ``rqvae/models/rqtransformer``): its input sequence at position ``t`` is

    u_1 = h_t + pos_1,   u_d = sum_{d' < d} e_{d'}(c_{t,d'}) + pos_d   (d = 2..D)

(``cumsum=True``, RQ-Transformer's ``cumsum_depth_ctx``; ``cumsum=False`` feeds ``e_{d-1}(c_{t,d-1})`` alone), and
output ``d`` goes to the head that predicts ``c_{t,d}``. ``e_d`` are the generator's code embeddings (the same
tables whose sum is the spatial input), ``pos_d`` a learned depth embedding.

Two equivalent paths, compared in the tests: :meth:`DepthTransformer.forward` (teacher-forced, causal mask over the
``D`` inputs of every position at once) and the cached one (:meth:`DepthTransformer.new_cache`,
:meth:`DepthTransformer.input_at`, :meth:`DepthTransformer.step`: one depth per call while sampling).

Our own rather than a library's: it is built from tokenloom's Llama blocks (``layers/``) so it shares their
attention, norms and KV cache, and no maintained package ships an RQ-Transformer depth stack.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tokenloom.generators.layers.block import TransformerBlock
from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import causal_mask
from tokenloom.generators.layers.norms import make_norm


class DepthTransformer(nn.Module):
    """A causal transformer over the ``D`` codes of each position.

    Args:
        width: ``C``, the width of the spatial transformer's output and of the code embeddings.
        depth: ``D``, codes per position (>= 2).
        num_layers, num_heads: size of the stack (``width`` divisible by ``num_heads``).
        mlp, multiple_of, mlp_ratio, norm_type, norm_eps: as in :class:`~tokenloom.generators.layers.block.
            TransformerBlock`.
        cumsum: input ``d`` is the sum of the embeddings of codes ``1..d-1`` (RQ-Transformer) rather than code
            ``d-1``'s alone.
    """

    def __init__(self, width: int, depth: int, num_layers: int = 2, num_heads: int = 4, *, mlp: str = "swiglu",
                 multiple_of: int = 256, mlp_ratio: float = 4.0, norm_type: str = "rms", norm_eps: float = 1e-5,
                 cumsum: bool = True):
        super().__init__()
        for name, value, low in (("depth", depth, 2), ("num_layers", num_layers, 1), ("num_heads", num_heads, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"depth transformer {name} must be an int >= {low}, got {value!r}")
        if width % num_heads:
            raise ValueError(f"width must be divisible by the depth transformer's num_heads, got width={width}, "
                             f"num_heads={num_heads}")
        if not isinstance(cumsum, bool):
            raise TypeError(f"cumsum must be a bool, got {cumsum!r}")
        self.depth, self.cumsum = depth, cumsum
        self.pos_embeddings = nn.Parameter(torch.zeros(depth, width))
        self.layers = nn.ModuleList(
            TransformerBlock(width, num_heads, mlp=mlp, multiple_of=multiple_of, mlp_ratio=mlp_ratio, norm=norm_type,
                             norm_eps=norm_eps)
            for _ in range(num_layers)
        )
        self.norm = make_norm(norm_type, width, norm_eps)

    def inputs(self, h: Tensor, code_emb: Tensor) -> Tensor:
        """All ``D`` inputs: ``h: [N, C]``, ``code_emb: [N, D', C]`` (``D' >= D - 1``; extra depths ignored)
        → ``[N, D, C]``."""
        ctx = code_emb[:, :self.depth - 1]
        if self.cumsum:
            ctx = ctx.cumsum(1)
        return torch.cat([h[:, None].to(ctx.dtype), ctx], 1) + self.pos_embeddings.to(ctx.dtype)

    def input_at(self, d: int, h: Tensor, running: Tensor | None) -> Tensor:
        """Input of depth ``d`` (0-based) ``[N, 1, C]``: ``h`` for ``d = 0``, else ``running`` — the sum (``cumsum``)
        or the last of the embeddings of codes ``0..d-1``, ``[N, C]``."""
        if not 0 <= d < self.depth:
            raise ValueError(f"d must lie in [0, {self.depth - 1}], got {d}")
        x = h if d == 0 else running
        return (x + self.pos_embeddings[d].to(x.dtype))[:, None]

    def _run(self, x: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, None, mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def forward(self, h: Tensor, code_emb: Tensor) -> Tensor:
        """Teacher-forced pass: ``h: [N, C]``, ``code_emb: [N, D', C]`` → ``[N, D, C]``; output ``d`` predicts
        code ``d`` from ``h`` and codes ``< d``."""
        x = self.inputs(h, code_emb)
        return self._run(x, causal_mask(self.depth, device=x.device), None)

    def new_cache(self, rows: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for ``rows`` positions' ``D`` depths."""
        attn = self.layers[0].attention
        return KVCache(len(self.layers), rows, attn.num_kv_heads, self.depth, attn.head_dim,
                       dtype=dtype or self.pos_embeddings.dtype, device=device or self.pos_embeddings.device)

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """Cached pass of one depth: ``x: [N, 1, C]`` from :meth:`input_at` → ``[N, C]``."""
        cache.check_room(x.shape[1])
        return self._run(x, None, cache)[:, 0]


__all__ = ["DepthTransformer"]
