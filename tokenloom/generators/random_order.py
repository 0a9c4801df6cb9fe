"""Random-order autoregressive generator: RandAR (position-instruction tokens, parallel decoding) and RAR.

Sequence (RandAR, ``order_signal="instruction"``): for an order ``o_1..o_L`` of the token positions,
``[prefix_0..prefix_{P-1}, I(o_1), x(o_1), I(o_2), x(o_2), ..., I(o_L)]`` (``x(o_L)`` is never an input).
``I(p)`` is the *position-instruction token* of target position ``p``; the hidden state at ``I(p)`` predicts the
token at ``p``.

* ``instruction_embedding="rope"`` (RandAR): ``I(p)`` is one shared learned vector, split into heads and rotated by the
  RoPE of cell ``p`` (so the input itself carries the target position); ``"learned"``: a table of ``L`` learned vectors.
* RoPE: the instruction token ``I(p)`` and the token ``x(p)`` both use the RoPE of grid cell ``p`` (RandAR: the
  instruction's rotation is the *target's*, so the query at ``I(p)`` and the key of ``x(p)`` sit at the same cell).
  2D RoPE on ``Grid`` layouts (LlamaGen's, row/column halves), 1D on ``Sequence`` layouts; prefix rows are zero
  (LlamaGen/RandAR) or identity (``prefix_rope``).

Sequence (RAR, ``order_signal="target_aware"``): ``[prefix, x(o_1), ..., x(o_{L-1})]`` with each input (the last prefix
token, then every token) adding the learned *target-aware positional embedding* of the position it predicts next
(RAR's ``target_aware_pos_embed``); the token's own position is given by RoPE (RAR adds a learned absolute position
embedding instead). One token per step only.

Training (``forward``): each row uses a random order with probability ``r`` and raster order otherwise (RAR's
randomness annealing): ``r = 1`` until ``anneal_start`` training steps, linear to 0 at ``anneal_end``, 0 after
(``anneal_start=None``: always random, RandAR). The step is counted by the model (one per ``forward`` in training
mode) or set by the trainer with :meth:`RandomOrderAR.set_training_progress` (e.g. when resuming: the count is not
saved with the weights). RAR then samples in raster order: ``inference_order="raster"``.

Generation (``generate``): RandAR's parallel decoding with a KV cache. Step ``s`` feeds ``k_s`` instruction tokens at
once, samples their ``k_s`` tokens from the ``k_s`` hidden states, and the next step feeds those tokens interleaved with
their instructions (RandAR drops the re-fed instructions' keys from the cache and writes them again, except the first
one's, which already saw exactly the interleaved context), so the cache always holds the training layout. Queries of one
step attend causally to each other (RandAR). ``k_s`` follows RandAR's cosine schedule over ``params.num_steps`` steps
(:func:`~tokenloom.generators.random_order_layers.randar_tokens_per_step`) or an explicit ``tokens_per_step``; one
backbone pass per step (the prefix goes into the first). Guidance doubles the batch (null condition rows);
step ``s`` uses ``params.at_step(s, steps)`` (RandAR's ramp over decoded tokens:
:func:`~tokenloom.generators.random_order_layers.randar_guidance_values` with ``GuidanceSchedule.steps``).

Inpainting / outpainting (``generate(..., known=Tokens, known_mask=[B, L])``): every row's order puts its known
positions first (random among themselves), teacher-forced in the first pass; then the unknown positions in random
order. Rows with more known tokens than the fewest in the batch teacher-force the extra ones where the schedule reaches
them (their sampled values are replaced). Known tokens come back unchanged.

Paths compared in the tests: full (:meth:`RandomOrderAR.hidden` over prefix + committed tokens + queries) and cached
(:meth:`RandomOrderAR.prefill` / :meth:`RandomOrderAR.step` on a :class:`RandomOrderCache`).

Written on tokenloom's Llama blocks (``layers/``) as :class:`~tokenloom.generators.raster_ar.RasterAR` (no library
has RandAR's interleaved layout); parameter names follow RandAR where they exist (``pos_instruct_embeddings``,
``tok_embeddings``, ``layers``, ``norm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokenloom.config import SamplingParams
from tokenloom.generators import register
from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.condition import Condition, as_condition
from tokenloom.generators.layers.block import TransformerBlock
from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import causal_mask, with_key_padding
from tokenloom.generators.layers.norms import make_norm
from tokenloom.generators.layers.prefix import Prefix, cat_prefixes, make_prefix
from tokenloom.generators.layers.rope import apply_rope, rope_table_1d, rope_table_2d
from tokenloom.generators.random_order_layers import (
    generation_orders,
    interleave,
    known_first,
    per_token,
    permute_probability,
    randar_tokens_per_step,
    training_orders,
)
from tokenloom.heads import HEADS
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

ORDER_SIGNALS = ("instruction", "target_aware")
INSTRUCTION_EMBEDDINGS = ("rope", "learned")
ORDERS = ("random", "raster")
KINDS = ("index", "bits", "continuous")


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


def _optional_step(name: str, value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
    return value


@register("random_order_ar")
class RandomOrderAR(TokenGenerator):
    """RandAR / RAR decoder over a token grid (or 1D sequence) in random order; see the module docstring.

    Args:
        token_spec: ``TokenSpec.to_dict()`` of the tokens: ``index`` (embedding per codebook, summed), ``bits``
            (Linear of ±1) or ``continuous`` (``Linear(dim, width)``); ``Grid`` or ``Sequence`` layout.
        width, depth, num_heads, num_kv_heads, mlp, multiple_of, ffn_dim_multiplier, mlp_ratio, norm_type, norm_eps,
            rope_base, prefix_rope, fused_qkv, dropout, token_dropout, condition, num_classes, cond_dim, cond_len,
            cond_dropout, text_hidden, initializer_range: as :class:`~tokenloom.generators.raster_ar.RasterAR`.
        head: head name (``"categorical"`` for index tokens, ``"diffusion"``/``"flow"`` for continuous ones,
            ``"bitwise"`` for bits); ``head_options``: its extra arguments (e.g. ``{"clip_denoised": 1.0}``). The module
            is ``self.output_head``.
        order_signal: ``"instruction"`` (RandAR) or ``"target_aware"`` (RAR; one token per step).
        instruction_embedding: ``"rope"`` (RandAR's shared vector rotated by the target's RoPE) or ``"learned"``.
        anneal_start, anneal_end: RAR's randomness annealing in training steps (None: always random orders).
        inference_order: default order of ``generate``: ``"random"`` (RandAR) or ``"raster"`` (RAR).
        num_steps: default decoding steps when ``params.num_steps`` is None (None: one token per step).
    """

    @register_to_config
    def __init__(
        self,
        token_spec: dict,
        width: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        mlp: str = "swiglu",
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        mlp_ratio: float = 4.0,
        norm_type: str = "rms",
        norm_eps: float = 1e-5,
        rope_base: float = 10000.0,
        prefix_rope: str = "zero",
        fused_qkv: bool = True,
        dropout: float = 0.0,
        token_dropout: float = 0.0,
        condition: str = "class",
        num_classes: int | None = None,
        cond_dim: int | None = None,
        cond_len: int | None = None,
        cond_dropout: float = 0.1,
        text_hidden: int | None = None,
        head: str = "categorical",
        head_options: dict | None = None,
        initializer_range: float = 0.02,
        order_signal: str = "instruction",
        instruction_embedding: str = "rope",
        anneal_start: int | None = None,
        anneal_end: int | None = None,
        inference_order: str = "random",
        num_steps: int | None = None,
    ):
        super().__init__()
        spec = TokenSpec.from_dict(token_spec)
        if isinstance(token_spec, TokenSpec):  # keep the config JSON-serialisable
            self.register_to_config(token_spec=spec.to_dict())
        head_cls = HEADS.get(head)
        if spec.kind not in head_cls.kinds:
            raise ValueError(f"head {head!r} ({head_cls.__name__}) models {head_cls.kinds} tokens but token_spec "
                             f"has kind={spec.kind!r}: {spec}")
        if not isinstance(spec.layout, (Grid, Sequence)):
            raise ValueError(f"RandomOrderAR generates tokens on a Grid or Sequence layout, got {spec.layout}")
        for name, value, allowed in (("order_signal", order_signal, ORDER_SIGNALS),
                                     ("instruction_embedding", instruction_embedding, INSTRUCTION_EMBEDDINGS),
                                     ("inference_order", inference_order, ORDERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if width % num_heads:
            raise ValueError(f"width must be divisible by num_heads, got width={width}, num_heads={num_heads}")
        _optional_step("anneal_start", anneal_start)
        _optional_step("anneal_end", anneal_end)
        if (anneal_start is None) != (anneal_end is None) or (
                anneal_start is not None and anneal_end < anneal_start):
            raise ValueError(f"anneal_start and anneal_end must both be None or ints with start <= end, got "
                             f"anneal_start={anneal_start!r}, anneal_end={anneal_end!r}")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                      or not 1 <= num_steps <= spec.length):
            raise ValueError(f"num_steps must be None or an int in [1, {spec.length}] (the tokens the layout holds), "
                             f"got {num_steps!r}")
        if order_signal == "target_aware" and num_steps not in (None, spec.length):
            raise ValueError(f"order_signal='target_aware' (RAR) decodes one token per step: num_steps must be None "
                             f"or {spec.length}, got {num_steps}")

        length, head_dim = spec.length, width // num_heads
        self.prefix = make_prefix(condition, width, num_classes=num_classes, cond_dim=cond_dim, cond_len=cond_len,
                                  dropout=cond_dropout, text_hidden=text_hidden)
        if spec.kind == "index":
            self.tok_embeddings = nn.Embedding(spec.vocab_size * spec.depth, width)
            self.register_buffer("code_offsets", torch.arange(spec.depth) * spec.vocab_size, persistent=False)
        else:
            self.tok_embeddings = nn.Linear(spec.channels, width)
        if order_signal == "instruction":
            if instruction_embedding == "rope":
                self.pos_instruct_embeddings = nn.Parameter(torch.zeros(width))
            else:
                self.instruction_embeddings = nn.Embedding(length, width)
        else:
            self.target_aware_embeddings = nn.Embedding(length, width)
        self.input_dropout = nn.Dropout(token_dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(width, num_heads, num_kv_heads, mlp=mlp, multiple_of=multiple_of,
                             ffn_dim_multiplier=ffn_dim_multiplier, mlp_ratio=mlp_ratio, norm=norm_type,
                             norm_eps=norm_eps, fused_qkv=fused_qkv, dropout=dropout)
            for _ in range(depth)
        )
        self.norm = make_norm(norm_type, width, norm_eps)
        p = self.prefix.length
        if isinstance(spec.layout, Grid):
            table = rope_table_2d(spec.layout.h, spec.layout.w, head_dim, rope_base, p, prefix_rope)
        else:
            table = rope_table_1d(length, head_dim, rope_base, p, prefix_rope)
        self.register_buffer("rope_table", table, persistent=False)  # [P + L, head_dim/2, 2]
        self._init_backbone(initializer_range)
        self.output_head = HEADS.build(head, spec=spec, width=width, **(head_options or {}))
        proj = getattr(self.output_head, "proj", None)
        if isinstance(proj, nn.Linear):  # LlamaGen / RandAR: the output layer starts at zero
            nn.init.zeros_(proj.weight)
        self.training_step = 0

    def _init_backbone(self, std: float) -> None:
        """Normal(0, std) Linear/Embedding weights, zero biases (LlamaGen/RandAR); the head keeps its own init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        if hasattr(self, "pos_instruct_embeddings"):
            nn.init.normal_(self.pos_instruct_embeddings, std=std)

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        """The parameters' device (diffusers' ``ModelMixin.device`` walks every parameter on each call)."""
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def condition_kind(self) -> str:
        return self.config.condition

    @property
    def prefix_length(self) -> int:
        """``P``: number of prefix positions."""
        return self.prefix.length

    @property
    def uses_instructions(self) -> bool:
        return self.config.order_signal == "instruction"

    # ---------------------------------------------------------------- RAR annealing
    def set_training_progress(self, step: int) -> None:
        """Set the training step that RAR's annealing reads (the trainer may call it before each step)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.training_step = step

    @property
    def permute_prob(self) -> float:
        """Probability that a training row uses a random order at the current training step."""
        return permute_probability(self.training_step, self.config.anneal_start, self.config.anneal_end)

    # ---------------------------------------------------------------- conditions
    def as_condition(self, cond, batch_size: int | None = None) -> Condition:
        """Accept a Condition, ``[B]`` labels, ``[B, Lc, Cc]`` features or None; check it fits this model."""
        if cond is None and batch_size is None:
            raise TypeError("cond must be a Condition (Condition(batch=B) for condition='none'), got None")
        return self.prefix.check(as_condition(cond, batch_size))

    def embed_prefix(self, cond: Condition, guided: bool = False, drop: bool | None = None) -> Prefix:
        """Prefix ``[B, P, C]`` (``[2B, P, C]`` with the null rows appended when ``guided``)."""
        cond = self.prefix.check(cond.to(self.device))
        prefix = self.prefix(cond, drop=drop)
        if guided:
            if getattr(cond, "uncond_features", None) is not None:
                negative = Condition(features=cond.uncond_features, mask=cond.uncond_mask)
                null = self.prefix(negative, drop=False)
            else:
                null = self.prefix.null(cond.batch_size, self.device)
            prefix = cat_prefixes(prefix, null)
        return prefix

    # ---------------------------------------------------------------- embeddings
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

    # ---------------------------------------------------------------- backbone
    def _run(self, x: Tensor, rope: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        """Blocks + final norm over ``x: [B, T, C]`` with per-row RoPE rows ``[B, T, D/2, 2]`` → ``[B, T, C]``."""
        x = self.input_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

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

    def hidden(self, prefix: Prefix, cells: Tensor, values: Tensor, queries: Tensor | None = None) -> Tensor:
        """Full (uncached) pass → ``z: [B, T + Q, C]``, the hidden state predicting each of ``cells`` then ``queries``.

        Args:
            prefix: from :meth:`embed_prefix` (``x: [B, P, C]``).
            cells: ``[B, T]`` positions of the committed tokens, in order; ``values: [B, T, channels]`` their tokens.
            queries: ``[B, Q]`` positions to predict after them (parallel decoding; target-aware: ``Q <= 1``).
        """
        b = prefix.x.shape[0]
        cells = self._check_cells(cells, "cells", b)
        values = self._check_values(values, cells)
        queries = cells[:, :0] if queries is None else self._check_cells(queries, "queries", b)
        self._check_sequence(cells, queries)
        x, rope = self._chunk(cells, values, queries, prefix=prefix)
        s, p, t = x.shape[1], self.prefix_length, cells.shape[1]
        mask = causal_mask(s, device=x.device)
        if prefix.key_valid is not None:
            ones = torch.ones(b, s - p, dtype=torch.bool, device=x.device)
            mask = with_key_padding(mask, torch.cat([prefix.key_valid, ones], dim=1))
        out = self._run(x, rope, mask, None)
        if self.uses_instructions:
            return torch.cat([out[:, p:p + 2 * t:2], out[:, p + 2 * t:]], dim=1)
        return out[:, p - 1:p - 1 + t + queries.shape[1]]

    # ---------------------------------------------------------------- cached decoding
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

    @property
    def _value_dtype(self) -> torch.dtype:
        return self.dtype if self.spec.kind == "continuous" else torch.long

    # ---------------------------------------------------------------- the two verbs
    def forward(self, tokens: Tokens, cond: Condition | Tensor | None = None, orders: Tensor | None = None,
                return_logits: bool = True) -> dict:
        """Teacher-forced training pass over one order per row.

        Args:
            tokens: ``Tokens`` of this spec ``[B, L, channels]`` (raster positions).
            cond: labels ``[B]``, text features or a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            orders: ``[B, L]`` permutations; None = random with probability :attr:`permute_prob`, else raster.
            return_logits: add ``"logits"`` ``[B, L, channels, V]`` at raster positions (heads with logits only).

        Returns:
            ``{"loss": scalar, "orders": [B, L], "logits": ...}``. In training mode condition dropout applies and the
            annealing step counter advances by one.
        """
        self.check_tokens(tokens)
        b, length = tokens.batch_size, self.spec.length
        cond = self.as_condition(cond, b if self.condition_kind == "none" else None)
        if cond.batch_size != b:
            raise ValueError(f"cond has batch size {cond.batch_size} but tokens have {b}")
        if orders is None:
            orders = training_orders(b, length, self.permute_prob, self.device)
        else:
            orders = self._check_orders(orders, b)
        data = tokens.data.to(self.device)
        values = data.gather(1, orders[..., None].expand(-1, -1, data.shape[-1]))  # [B, L, channels] in order
        z = self.hidden(self.embed_prefix(cond), orders[:, :-1], values[:, :-1], orders[:, -1:])  # [B, L, C]
        z_flat = z.flatten(0, 1)
        out = {"loss": self.output_head.loss(z_flat, values.flatten(0, 1)).mean(), "orders": orders}
        if return_logits and hasattr(self.output_head, "sample_logits"):
            logits = self.output_head.logits(z_flat).unflatten(0, (b, length))
            index = orders.view(b, length, *([1] * (logits.dim() - 2))).expand_as(logits)
            out["logits"] = torch.empty_like(logits).scatter_(1, index, logits)
        if self.training:
            self.training_step += 1
        return out

    def _check_orders(self, orders, b: int) -> Tensor:
        length = self.spec.length
        if not isinstance(orders, Tensor) or orders.shape != (b, length) or orders.is_floating_point():
            raise ValueError(f"orders must be an integer tensor of shape [{b}, {length}] (one permutation of the "
                             f"positions per row), got {getattr(orders, 'shape', type(orders).__name__)}")
        orders = orders.long().to(self.device)
        if not torch.equal(orders.sort(dim=1).values, torch.arange(length, device=self.device).expand(b, -1)):
            raise ValueError("orders must hold a permutation of 0..L-1 in every row")
        return orders

    def _check_known(self, known, known_mask, b: int) -> tuple[Tensor | None, Tensor | None]:
        known, known_mask = self.check_known(known, known_mask, b)
        return (None, None) if known is None else (known.data.to(self.device), known_mask)

    def _check_generate_args(self, cond, params, generator, decoding):
        if decoding is not None:
            raise ValueError(f"decoding must be None for RandomOrderAR (parallel decoding is set by "
                             f"params.num_steps / tokens_per_step), got {decoding!r}")
        return self.check_generate_args(cond, params, generator)

    def _schedule(self, remaining: int, params: SamplingParams, tokens_per_step) -> list[int]:
        length = self.spec.length
        if tokens_per_step is not None:
            counts = [int(k) for k in tokens_per_step]
            if any(k < 1 for k in counts) or sum(counts) != remaining:
                raise ValueError(f"tokens_per_step must be positive ints summing to the {remaining} tokens to "
                                 f"generate, got {list(tokens_per_step)} (sum {sum(counts)})")
            schedule = counts
        else:
            steps = params.num_steps if params.num_steps is not None else self.config.num_steps
            if steps is None:
                steps = remaining
            if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= length:
                raise ValueError(f"num_steps must be an int in [1, {length}] (the tokens the layout holds), got "
                                 f"{steps!r}")
            schedule = randar_tokens_per_step(remaining, min(steps, remaining))
        if not self.uses_instructions and any(k != 1 for k in schedule):
            raise ValueError(f"order_signal='target_aware' (RAR) decodes one token per step; got tokens per step "
                             f"{schedule}")
        gs = params.guidance_schedule
        if gs.kind == "steps" and len(gs.values) != len(schedule):
            raise ValueError(f"GuidanceSchedule.values has {len(gs.values)} entries but the generation takes "
                             f"{len(schedule)} steps")
        return schedule

    @torch.no_grad()
    def generate(
        self,
        cond: Condition | Tensor | None,
        params: SamplingParams | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decoding=None,
        progress: bool = False,
        *,
        known: Tokens | None = None,
        known_mask: Tensor | None = None,
        order: str | Tensor | None = None,
        tokens_per_step: list[int] | None = None,
    ) -> Tokens:
        """Sample ``Tokens`` of this spec with RandAR's parallel decoding (one backbone pass per step).

        Args:
            cond: labels ``[B]``, text features or a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            params: sampling params; step ``s`` of ``S`` uses ``params.at_step(s, S)``; ``num_steps`` is the number of
                decoding steps ``S`` (None: the config's ``num_steps``, else one token per step); a diffusion/flow
                head's own steps are head options.
            generator: one ``torch.Generator`` or a list of ``B`` (row ``i``'s order and tokens depend only on its own).
            decoding: None (RandAR's parallel decoding) or a ``tokenloom.generators.decoding`` algorithm (SJD,
                LANTERN, GroupedSD), which samples the one-token-per-step joint in the row's ``order``.
            progress: show a tqdm bar over the steps.
            known, known_mask: inpainting — ``Tokens`` of this spec and ``[B, L]`` bool (True = keep); known tokens are
                ordered first and come back unchanged.
            order: ``"random"``, ``"raster"`` or ``[B, L]`` permutations (None: the config's ``inference_order``).
            tokens_per_step: explicit tokens decoded per step (sums to the tokens to generate); overrides num_steps.
        """
        if decoding is not None:  # speculative decoders: tokenloom.generators.decoding
            from tokenloom.generators.decoding import run_decoding

            if known is not None or known_mask is not None or tokens_per_step is not None:
                raise ValueError(f"known/known_mask/tokens_per_step are not supported with decoding={decoding!r}")
            return run_decoding(decoding, self, cond, params, generator, order=order)
        cond, params = self._check_generate_args(cond, params, generator, decoding)
        b, length, channels = cond.batch_size, self.spec.length, self.spec.channels
        known_data, known_mask = self._check_known(known, known_mask, b)
        order = self.config.inference_order if order is None else order
        if isinstance(order, Tensor):
            orders = self._check_orders(order, b)
            orders = orders if known_mask is None else known_first(orders, known_mask)
        elif order in ORDERS:
            orders = generation_orders(generator, b, length, self.device, order == "random", known_mask)
        else:
            raise ValueError(f"order must be one of {ORDERS} or a [B, L] tensor, got {order!r}")
        n_known = 0 if known_mask is None else int(known_mask.sum(1).min())
        values = torch.zeros(b, length, channels, device=self.device, dtype=self._value_dtype)
        if known_data is not None:
            known_in_order = known_data.gather(1, orders[..., None].expand(-1, -1, channels))
            known_flag = known_mask.gather(1, orders)  # [B, L] in order
            values[:, :n_known] = known_in_order[:, :n_known]
        if n_known == length:
            return Tokens(known_data.clone(), self.spec)
        schedule = self._schedule(length - n_known, params, tokens_per_step)

        guided = params.uses_guidance
        twice = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        prefix = self.embed_prefix(cond, guided, drop=False)
        cache = self.new_cache(prefix.x.shape[0])
        done = n_known
        z = self.prefill(prefix, cache, twice(orders[:, :done]), twice(values[:, :done]),
                         twice(orders[:, done:done + schedule[0]]))
        for s, k in enumerate(tqdm(schedule, disable=not progress, desc="random_order_ar", leave=False)):
            p = params.at_step(s, len(schedule)).replace(num_steps=None)
            z_cond = z[:b].flatten(0, 1)
            z_uncond = z[b:].flatten(0, 1) if guided and p.guidance_scale != 1.0 else None
            p_tok, g_tok = per_token(p, generator, k)
            sampled = self.output_head.sample(z_cond, p_tok, g_tok, z_uncond=z_uncond).view(b, k, channels)
            if known_data is not None:
                flag = known_flag[:, done:done + k, None]
                sampled = torch.where(flag, known_in_order[:, done:done + k], sampled.to(values.dtype))
            values[:, done:done + k] = sampled.to(values.dtype)
            done += k
            if s + 1 < len(schedule):
                nxt = schedule[s + 1]
                z = self.step(cache, twice(orders[:, done - k:done]), twice(values[:, done - k:done]),
                              twice(orders[:, done:done + nxt]))
        out = torch.empty_like(values).scatter_(1, orders[..., None].expand(-1, -1, channels), values)
        return Tokens(out, self.spec)


__all__ = ["RandomOrderAR", "RandomOrderCache"]
