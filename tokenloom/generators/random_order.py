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

Generation and inpainting (``generate``) are described in :mod:`~tokenloom.generators.random_order_generate`; the
KV-cached path (:meth:`RandomOrderAR.prefill` / :meth:`RandomOrderAR.step`) in
:mod:`~tokenloom.generators.random_order_cache`; how the input sequence is built (embeddings, instruction tokens, RoPE
rows) in :mod:`~tokenloom.generators.random_order_inputs`. The class joins them as mixins.

Written on tokenloom's Llama blocks (``layers/``) as :class:`~tokenloom.generators.raster_ar.RasterAR` (no library
has RandAR's interleaved layout); parameter names follow RandAR where they exist (``pos_instruct_embeddings``,
``tok_embeddings``, ``layers``, ``norm``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from tokenloom.generators import register
from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.condition import Condition, as_condition
from tokenloom.generators.layers.block import TransformerBlock
from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import causal_mask, with_key_padding
from tokenloom.generators.layers.norms import make_norm
from tokenloom.generators.layers.prefix import Prefix, cat_prefixes, make_prefix
from tokenloom.generators.layers.rope import rope_table_1d, rope_table_2d
from tokenloom.generators.random_order_cache import RandomOrderCache, RandomOrderCaching
from tokenloom.generators.random_order_generate import ORDERS, RandomOrderGeneration
from tokenloom.generators.random_order_inputs import RandomOrderInputs
from tokenloom.generators.random_order_layers import permute_probability, training_orders
from tokenloom.heads import HEADS
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

ORDER_SIGNALS = ("instruction", "target_aware")
INSTRUCTION_EMBEDDINGS = ("rope", "learned")
KINDS = ("index", "bits", "continuous")


def _optional_step(name: str, value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
    return value


@register("random_order_ar")
class RandomOrderAR(RandomOrderInputs, RandomOrderCaching, RandomOrderGeneration, TokenGenerator):
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

    # ---------------------------------------------------------------- backbone
    def _run(self, x: Tensor, rope: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        """Blocks + final norm over ``x: [B, T, C]`` with per-row RoPE rows ``[B, T, D/2, 2]`` → ``[B, T, C]``."""
        x = self.input_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

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


__all__ = ["ORDERS", "RandomOrderAR", "RandomOrderCache"]
