"""Raster-order autoregressive generator (LlamaGen-style Llama decoder over a token grid or 1D sequence).

Sequence layout (as LlamaGen's training): ``[prefix_0..prefix_{P-1}, e(x_0), ..., e(x_{L-2})]``; the last
prefix position predicts ``x_0`` and the position of ``e(x_{p-1})`` predicts ``x_p``. 2D RoPE rotates
token ``x_p`` with its own grid cell (1D RoPE: its index; the only choice for ``Sequence`` layouts); prefix rows are
zero (LlamaGen) or identity.

Token kinds (the head decides ``p(x_p | z_p)``):

* ``index``, ``depth = 1``: ``e`` is an embedding table (LlamaGen's ``tok_embeddings``), head ``categorical``;
* ``index``, ``depth = D > 1`` (RVQ): ``e(x_p)`` is the sum of the ``D`` code embeddings (one table per depth) and
  the ``D`` codes of a position come from a small causal depth transformer
  (:class:`~tokenloom.generators.depth_transformer.DepthTransformer`, RQ-Transformer) on top of ``z_p``; the
  categorical head (shared by the depths, as RQ-Transformer's classifier) reads each depth's output;
* ``bits``: ``e`` is ``Linear(bits, C)`` of the ±1 bits, head ``bitwise``;
* ``continuous``: ``e`` is ``Linear(dim, C)``, head ``diffusion`` or ``flow`` (per-token, MAR/FlowAR-style).

``Sequence`` layouts (FlexTok): any prefix is a valid token sequence, so training accepts prefixes and
``generate(..., num_tokens=N')`` samples the first ``N' <= N`` tokens (``N'`` forward passes); the tokenizer decodes
the prefix.

Two equivalent paths, compared in the tests:

* full (uncached): :meth:`RasterAR.hidden` / :meth:`RasterAR.full_logits` over the whole sequence;
* cached: :meth:`RasterAR.new_cache`, :meth:`RasterAR.prefill` (the prefix), :meth:`RasterAR.step`
  (``T >= 1`` new tokens at the cache's current position). Speculative decoders use ``step`` with several
  draft tokens and ``KVCache.truncate`` to roll back.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokenloom.config import SamplingParams
from tokenloom.generators import register
from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.condition import Condition, as_condition
from tokenloom.generators.depth_transformer import DepthTransformer
from tokenloom.generators.layers.block import TransformerBlock
from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import causal_mask, with_key_padding
from tokenloom.generators.layers.norms import make_norm
from tokenloom.generators.layers.prefix import Prefix, cat_prefixes, make_prefix
from tokenloom.generators.layers.rope import rope_table_1d, rope_table_2d
from tokenloom.heads import HEADS
from tokenloom.heads.base import Head
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

ROPES = ("2d", "1d")


@register("raster_ar")
class RasterAR(TokenGenerator):
    """Llama-style decoder generating tokens of a :class:`Grid` (raster order) or :class:`Sequence` (prefix order).

    Args:
        token_spec: ``TokenSpec.to_dict()`` of the tokens: ``index`` (any RVQ depth), ``bits`` or ``continuous``, on
            a Grid or Sequence layout.
        width, depth, num_heads, num_kv_heads: transformer size (``head_dim = width / num_heads``).
        mlp: ``"swiglu"`` | ``"gelu"`` | ``"gelu_tanh"``; ``multiple_of``/``ffn_dim_multiplier`` size SwiGLU
            (LlamaGen), ``mlp_ratio`` sizes GELU MLPs.
        norm_type, norm_eps: ``"rms"`` | ``"layer"`` and its epsilon.
        rope_type: ``"2d"`` (row/column, LlamaGen; Grid only) or ``"1d"`` (raster index); None = ``"2d"`` on a Grid,
            ``"1d"`` on a Sequence. ``rope_base`` its base; ``prefix_rope``: ``"zero"`` (LlamaGen: cos = sin = 0 on
            prefix rows) or ``"identity"``.
        fused_qkv: one ``wqkv`` projection.
        dropout: residual-branch dropout in every block; ``token_dropout``: dropout on the input sequence
            (prefix + token embeddings), as LlamaGen's ``resid/ffn_dropout_p`` and ``token_dropout_p``.
        condition: ``"class"`` (``num_classes``), ``"text"`` (``cond_dim``, ``cond_len``, optional
            ``text_hidden`` MLP width) or ``"none"``; ``cond_dropout``: training probability of the null condition.
        head: head name in the heads registry; ``head_options``: extra head arguments (e.g. ``{"bias": True}``).
            The head module is ``self.output_head`` (``self.head`` would read the config entry: diffusers'
            ``ModelMixin.__getattr__`` prefers config keys over sub-modules).
        initializer_range: std of the normal init of the backbone's Linear/Embedding weights (a categorical or
            bitwise head's projection starts at zero; diffusion/flow heads keep their own init).
        depth_layers, depth_heads, depth_cumsum: the depth transformer of ``index`` tokens with ``depth > 1``
            (layers, heads — None = ``num_heads`` — and RQ-Transformer's cumulative code-embedding input); unused
            otherwise.
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
        rope_type: str | None = None,
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
        depth_layers: int = 2,
        depth_heads: int | None = None,
        depth_cumsum: bool = True,
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
            raise ValueError(f"RasterAR generates tokens on a Grid or Sequence layout, got {spec.layout} (a Scales "
                             "pyramid is generated by 'next_scale')")
        if rope_type is None:
            rope_type = "2d" if isinstance(spec.layout, Grid) else "1d"
        if rope_type not in ROPES:
            raise ValueError(f"rope_type must be None or one of {ROPES}, got {rope_type!r}")
        if rope_type == "2d" and not isinstance(spec.layout, Grid):
            raise ValueError(f"rope_type='2d' needs a Grid layout, got {spec.layout}; use rope_type='1d' (or None)")
        if width % num_heads:
            raise ValueError(f"width must be divisible by num_heads, got width={width}, num_heads={num_heads}")

        self.prefix = make_prefix(condition, width, num_classes=num_classes, cond_dim=cond_dim, cond_len=cond_len,
                                  dropout=cond_dropout, text_hidden=text_hidden)
        if spec.kind == "index":  # one table per codebook, stacked; depth 1 is LlamaGen's [V, C] table
            self.tok_embeddings = nn.Embedding(spec.vocab_size * spec.depth, width)
            self.register_buffer("code_offsets", torch.arange(spec.depth) * spec.vocab_size, persistent=False)
        else:
            self.tok_embeddings = nn.Linear(spec.channels, width)
        self.input_dropout = nn.Dropout(token_dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(width, num_heads, num_kv_heads, mlp=mlp, multiple_of=multiple_of,
                             ffn_dim_multiplier=ffn_dim_multiplier, mlp_ratio=mlp_ratio, norm=norm_type,
                             norm_eps=norm_eps, fused_qkv=fused_qkv, dropout=dropout)
            for _ in range(depth)
        )
        self.norm = make_norm(norm_type, width, norm_eps)
        head_spec = spec
        if spec.kind == "index" and spec.depth > 1:
            self.depth_transformer = DepthTransformer(
                width, spec.depth, depth_layers, num_heads if depth_heads is None else depth_heads, mlp=mlp,
                multiple_of=multiple_of, mlp_ratio=mlp_ratio, norm_type=norm_type, norm_eps=norm_eps,
                cumsum=depth_cumsum)
            head_spec = replace(spec, depth=1)  # the head models one code; the depth transformer gives one z per depth
        self.output_head = HEADS.build(head, spec=head_spec, width=width, **(head_options or {}))

        head_dim, p = width // num_heads, self.prefix.length
        if rope_type == "2d":
            table = rope_table_2d(spec.layout.h, spec.layout.w, head_dim, rope_base, p, prefix_rope)
        else:
            table = rope_table_1d(spec.length, head_dim, rope_base, p, prefix_rope)
        self.register_buffer("rope_table", table, persistent=False)  # [P + L, head_dim/2, 2]
        self._init_weights(initializer_range)

    def _init_weights(self, std: float) -> None:
        """Normal(0, std) backbone Linear/Embedding weights, zero biases; a head with a ``proj`` Linear starts at zero
        (LlamaGen), other heads (diffusion/flow MLPs) keep their own init."""
        head_modules = set(self.output_head.modules())
        for m in self.modules():
            if m in head_modules:
                continue
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        if self.depth_transformer is not None:
            nn.init.normal_(self.depth_transformer.pos_embeddings, std=std)
        proj = getattr(self.output_head, "proj", None)
        if isinstance(proj, nn.Linear):
            nn.init.zeros_(proj.weight)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    @property
    def depth_transformer(self) -> DepthTransformer | None:
        """The RQ-Transformer depth stack (``index`` tokens with ``depth > 1``), else None."""
        return self._modules.get("depth_transformer")

    # ---------------------------------------------------------------- conditions
    @property
    def condition_kind(self) -> str:
        return self.config.condition

    @property
    def prefix_length(self) -> int:
        """``P``: number of prefix positions."""
        return self.prefix.length

    def as_condition(self, cond, batch_size: int | None = None) -> Condition:
        """Accept a Condition, ``[B]`` labels, ``[B, Lc, Cc]`` features or None; check it fits this model."""
        if cond is None and batch_size is None:
            raise TypeError("cond must be a Condition (Condition(batch=B) for condition='none'), got None")
        return self.prefix.check(as_condition(cond, batch_size))

    def embed_prefix(self, cond: Condition, guided: bool = False, drop: bool | None = None) -> Prefix:
        """Prefix ``[B, P, C]`` (``[2B, P, C]`` with the null rows appended when ``guided``).

        The null rows are the learned null condition, or ``cond.uncond_features`` (negative prompt) when set.
        """
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

    # ---------------------------------------------------------------- token values
    @property
    def _value_dtype(self) -> torch.dtype:
        return self.dtype if self.spec.kind == "continuous" else torch.long

    def _check_codes(self, codes: Tensor, max_len: int, name: str = "codes") -> Tensor:
        """Token values ``[B, T, channels]`` (or ``[B, T]`` for index tokens of depth 1) with ``T <= max_len``
        → ``[B, T, channels]`` (long, or float for continuous tokens)."""
        spec = self.spec
        if isinstance(codes, Tensor) and codes.dim() == 2 and spec.kind == "index" and spec.depth == 1:
            codes = codes[..., None]
        if not isinstance(codes, Tensor) or codes.dim() != 3 or codes.shape[-1] != spec.channels:
            shape = f"[B, T, {spec.channels}]" + (" or [B, T]" if spec.kind == "index" and spec.depth == 1 else "")
            raise TypeError(f"{name} must be a tensor {shape} of {spec.kind!r} token values, got "
                            f"{tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__}")
        if codes.shape[1] > max_len:
            raise ValueError(f"{name} may hold at most {max_len} tokens here, got {codes.shape[1]}")
        if spec.kind == "continuous":
            if not codes.is_floating_point():
                raise TypeError(f"{name} must be a float tensor for continuous tokens, got {codes.dtype}")
            return codes
        if codes.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor for {spec.kind!r} tokens, got {codes.dtype}")
        high = spec.vocab_size if spec.kind == "index" else 2
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= high):
            raise ValueError(f"{name} values must lie in [0, {high - 1}], got [{int(codes.min())}, "
                             f"{int(codes.max())}]")
        return codes.long()

    def code_embeddings(self, codes: Tensor) -> Tensor:
        """Per-codebook embeddings of index tokens ``[..., depth]`` → ``[..., depth, C]``."""
        return self.tok_embeddings(codes.long() + self.code_offsets)

    def embed_values(self, values: Tensor) -> Tensor:
        """Token values ``[B, T, channels]`` → spatial inputs ``[B, T, C]`` (index: the sum over codebooks)."""
        kind = self.spec.kind
        if kind == "index":
            return self.code_embeddings(values).sum(-2)
        if kind == "bits":
            return self.tok_embeddings(values.to(self.tok_embeddings.weight.dtype) * 2 - 1)
        return self.tok_embeddings(values.to(self.tok_embeddings.weight.dtype))

    # ---------------------------------------------------------------- backbone
    def _run(self, x: Tensor, start: int, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        """Blocks + final norm over ``x: [B, T, C]`` at positions ``start..start+T-1`` → ``[B, T, C]``."""
        rope = self.rope_table[start:start + x.shape[1]]
        x = self.input_dropout(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)

    def hidden(self, prefix: Prefix, codes: Tensor) -> Tensor:
        """Full (uncached) pass: ``prefix.x: [B, P, C]``, token values ``codes: [B, T, channels]`` (or ``[B, T]``;
        ``T <= L - 1``) → ``z: [B, T + 1, C]``.

        ``z[:, i]`` predicts token ``i`` (the last prefix position predicts token 0).
        """
        codes = self._check_codes(codes, self.spec.length - 1)
        x = torch.cat([prefix.x, self.embed_values(codes).to(prefix.x.dtype)], dim=1)
        s = x.shape[1]
        mask = causal_mask(s, device=x.device)
        if prefix.key_valid is not None:
            ones = torch.ones(codes.shape[:2], dtype=torch.bool, device=x.device)
            mask = with_key_padding(mask, torch.cat([prefix.key_valid, ones], dim=1))
        return self._run(x, 0, mask, None)[:, self.prefix_length - 1:]

    def depth_hidden(self, z: Tensor, codes: Tensor) -> Tensor:
        """Teacher-forced depth transformer: spatial outputs ``z: [N, C]`` and the codes of those positions
        ``[N, depth]`` → ``[N, depth, C]`` (output ``d`` predicts code ``d``). Index tokens with ``depth > 1`` only."""
        if self.depth_transformer is None:
            raise ValueError(f"depth_hidden needs index tokens with depth > 1, got {self.spec}")
        return self.depth_transformer(z, self.code_embeddings(codes).to(z.dtype))

    def full_logits(self, cond, codes: Tensor, guided: bool = False) -> Tensor:
        """Uncached logits ``[B', T + 1, channels, V]`` for ``codes: [B, T]`` or ``[B, T, channels]``
        (``B' = 2B`` with null rows if guided). Heads with logits only; for ``depth > 1`` the logits of a position
        depend on its own earlier codes: use ``forward(tokens)["logits"]`` or :meth:`depth_hidden`."""
        if self.depth_transformer is not None:
            raise ValueError("full_logits gives next-position logits, which for depth > 1 need the position's own "
                             "codes; use forward(tokens)['logits'] or depth_hidden")
        cond = self.as_condition(cond)
        prefix = self.embed_prefix(cond, guided, drop=False)
        if guided:
            codes = torch.cat([codes, codes])
        z = self.hidden(prefix, codes)
        return self.output_head.logits(z.flatten(0, 1)).unflatten(0, z.shape[:2])

    # ---------------------------------------------------------------- cached decoding
    def new_cache(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for ``batch_size`` rows holding the prefix and every token position (``P + L``)."""
        attn = self.layers[0].attention
        return KVCache(len(self.layers), batch_size, attn.num_kv_heads, self.prefix_length + self.spec.length,
                       attn.head_dim, dtype=dtype or self.dtype, device=device or self.device)

    def prefill(self, prefix: Prefix, cache: KVCache) -> Tensor:
        """Run the prefix into an empty ``cache`` → ``z: [B, C]`` of the last prefix position (predicts ``c_0``)."""
        if cache.length != 0 or cache.batch_size != prefix.x.shape[0]:
            raise ValueError(f"prefill needs an empty cache of {prefix.x.shape[0]} rows, got length={cache.length}, "
                             f"rows={cache.batch_size}")
        p = prefix.x.shape[1]
        mask = causal_mask(p, device=prefix.x.device)
        if prefix.key_valid is not None:
            cache.key_valid = torch.ones(cache.batch_size, cache.max_length, dtype=torch.bool,
                                         device=prefix.x.device)
            cache.key_valid[:, :p] = prefix.key_valid
            mask = with_key_padding(mask, prefix.key_valid)
        return self._run(prefix.x, 0, mask, cache)[:, -1]

    def step(self, codes: Tensor, cache: KVCache) -> Tensor:
        """Feed ``codes: [B, T, channels]`` (or ``[B, T]``) at the cache's position → ``z: [B, T, C]``; ``z[:, i]``
        predicts the next token."""
        start = cache.length
        if start < self.prefix_length:
            raise ValueError("step needs a cache filled by prefill first")
        codes = self._check_codes(codes, self.prefix_length + self.spec.length - start)
        t = codes.shape[1]
        cache.check_room(t)
        x = self.embed_values(codes).to(cache.k.dtype)
        mask = None
        if t > 1 or cache.key_valid is not None:
            mask = causal_mask(t, start + t, device=x.device)
            if cache.key_valid is not None:
                mask = with_key_padding(mask, cache.key_valid[:, :start + t])
        return self._run(x, start, mask, cache)

    def step_at(self, codes: Tensor, cells: Tensor, cache: KVCache, mask: Tensor) -> Tensor:
        """Decoding hook for out-of-raster-order schedules (ZipAR in ``generators/decoding``).

        Feed ``codes: [B, T]`` (or ``[B, T, channels]``) whose layout cells are ``cells: [T]`` long into the cache's
        next ``T`` slots with an explicit ``mask`` (bool ``[T, S]`` or ``[B, 1, T, S]``, ``S`` = cache length + T,
        True = may attend) → ``z: [B, T, C]``; ``z[:, i]`` predicts the token after cell ``cells[i]`` in raster order.
        """
        if cache.length < self.prefix_length:
            raise ValueError("step_at needs a cache filled by prefill first")
        codes = self._check_codes(codes, cache.max_length - cache.length)
        cache.check_room(codes.shape[1])
        x = self.input_dropout(self.embed_values(codes).to(cache.k.dtype))
        rope = self.rope_table[self.prefix_length + cells]
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache.layers[i])
        cache.advance(codes.shape[1])
        return self.norm(x)

    def sample_position(self, z: Tensor, params: SamplingParams, generator, rows: int, guided: bool) -> Tensor:
        """Draw the token of one position per row from its spatial output ``z: [B or 2B, C]`` → ``[B, channels]``.

        ``rows = B``; when ``guided``, rows ``B..2B-1`` of ``z`` are the unconditional ones (used when
        ``params.guidance_scale != 1``). For ``depth > 1`` the depth transformer draws the codes one after another
        with its own KV cache, every depth with ``params``.
        """
        use_uncond = guided and params.guidance_scale != 1.0
        if self.depth_transformer is None:
            return self.output_head.sample(z[:rows], params, generator, z_uncond=z[rows:] if use_uncond else None)
        dt = self.depth_transformer
        cache = dt.new_cache(z.shape[0], dtype=z.dtype)
        codes = torch.empty(rows, self.spec.depth, dtype=torch.long, device=z.device)
        running = None
        for d in range(self.spec.depth):
            zd = dt.step(dt.input_at(d, z, running), cache)  # [B or 2B, C]
            codes[:, d] = self.output_head.sample(zd[:rows], params, generator,
                                                  z_uncond=zd[rows:] if use_uncond else None)[:, 0]
            if d + 1 < self.spec.depth:
                emb = self.tok_embeddings(codes[:, d] + self.code_offsets[d]).to(z.dtype)
                emb = torch.cat([emb, emb]) if guided else emb
                running = emb if running is None or not dt.cumsum else running + emb
        return codes

    # ---------------------------------------------------------------- the two verbs
    def forward(self, tokens: Tokens, cond: Condition | Tensor | None = None, return_logits: bool = True) -> dict:
        """Teacher-forced training pass over ``tokens`` (``[B, L', channels]``; ``L' < L`` only for Sequence layouts).

        Returns ``{"loss": scalar, "logits": [B, L', channels, V]}`` (logits only when ``return_logits`` and the
        head has them). Condition dropout applies in training mode.
        """
        self.check_tokens(tokens)
        b = tokens.batch_size
        cond = self.as_condition(cond, b if self.condition_kind == "none" else None)
        if cond.batch_size != b:
            raise ValueError(f"cond has batch size {cond.batch_size} but tokens have {b}")
        target = tokens.data.to(self.device)  # [B, L', channels]
        z = self.hidden(self.embed_prefix(cond), target[:, :-1])  # [B, L', C]
        z_flat, target_flat = z.flatten(0, 1), target.flatten(0, 1)
        if self.depth_transformer is not None:
            z_flat = self.depth_hidden(z_flat, target_flat).flatten(0, 1)  # [N·D, C]
            target_flat = target_flat.reshape(-1, 1)
        loss = self.output_head.loss(z_flat, target_flat)
        out = {"loss": loss.mean()}
        if return_logits and type(self.output_head).logits is not Head.logits:
            out["logits"] = self.output_head.logits(z_flat).reshape(b, target.shape[1], self.spec.channels, -1)
        return out

    @torch.no_grad()
    def generate(
        self,
        cond: Condition | Tensor | None,
        params: SamplingParams | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decoding=None,
        progress: bool = False,
        *,
        num_tokens: int | None = None,
    ) -> Tokens:
        """Sample ``Tokens`` of this model's spec, one position per cached step, with classifier-free guidance.

        Args:
            cond: labels ``[B]``, a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            params: sampling params; the guidance scale of step ``t`` is ``params.at_step(t, N')`` (every depth of a
                position uses its step's params).
            generator: one ``torch.Generator`` or a list of ``B`` (row ``i`` then depends only on its own).
            decoding: None (one token per step) or a ``tokenloom.generators.decoding`` algorithm (SJD, LANTERN,
                GroupedSD, ZipAR), which then runs the whole generation.
            progress: show a tqdm bar.
            num_tokens: ``Sequence`` layouts only: generate the first ``N' <= L`` tokens (FlexTok: a prefix decodes
                to a coarser image); None = all ``L``.
        """
        if decoding is not None:  # speculative / parallel decoders: tokenloom.generators.decoding
            from tokenloom.generators.decoding import run_decoding

            if num_tokens is not None:
                raise ValueError(f"num_tokens is not supported with decoding={decoding!r}; got {num_tokens}")
            return run_decoding(decoding, self, cond, params, generator)
        cond, params = self.check_generate_args(cond, params, generator)
        num_tokens = self._check_num_tokens(num_tokens)
        guided = params.uses_guidance
        was_training = self.training
        self.eval()  # no dropout while sampling, whatever mode the caller left the model in
        try:
            codes = self._decode(cond, params, generator, guided, progress, num_tokens)
        finally:
            self.train(was_training)
        return Tokens(codes, self.spec)

    def _check_num_tokens(self, num_tokens) -> int:
        length = self.spec.length
        if num_tokens is None:
            return length
        if not isinstance(self.spec.layout, Sequence):
            if num_tokens == length and not isinstance(num_tokens, bool):
                return length
            raise ValueError(f"num_tokens must be None or {length} for a {type(self.spec.layout).__name__} layout "
                             f"(only Sequence layouts decode a prefix), got {num_tokens!r}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= length:
            raise ValueError(f"num_tokens must be None or an int in [1, {length}] (the tokens the layout holds), got "
                             f"{num_tokens!r}")
        return num_tokens

    def _decode(self, cond: Condition, params: SamplingParams, generator, guided: bool, progress: bool,
                num_tokens: int | None = None) -> Tensor:
        """One-position-per-step cached decoding → values ``[B, N', channels]``."""
        b = cond.batch_size
        length = self.spec.length if num_tokens is None else num_tokens
        prefix = self.embed_prefix(cond, guided, drop=False)
        cache = self.new_cache(prefix.x.shape[0])
        z = self.prefill(prefix, cache)  # [B or 2B, C]
        codes = torch.empty(b, length, self.spec.channels, dtype=self._value_dtype, device=self.device)
        for t in tqdm(range(length), disable=not progress, desc="raster_ar", leave=False):
            p = params.at_step(t, length)
            codes[:, t] = self.sample_position(z, p, generator, b, guided).to(codes.dtype)
            if t + 1 < length:
                feed = codes[:, t:t + 1]
                z = self.step(torch.cat([feed, feed]) if guided else feed, cache)[:, 0]
        return codes
