"""Raster-order autoregressive generator (LlamaGen-style Llama decoder over a token grid).

Sequence layout (as LlamaGen's training): ``[prefix_0..prefix_{P-1}, e(c_0), ..., e(c_{L-2})]``; the last
prefix position predicts ``c_0`` and the position of ``e(c_{p-1})`` predicts ``c_p``. 2D RoPE rotates
token ``c_p`` with its own grid cell; prefix rows are zero (LlamaGen) or identity.

Two equivalent paths, compared in the tests:

* full (uncached): :meth:`RasterAR.hidden` / :meth:`RasterAR.full_logits` over the whole sequence;
* cached: :meth:`RasterAR.new_cache`, :meth:`RasterAR.prefill` (the prefix), :meth:`RasterAR.step`
  (``T >= 1`` new tokens at the cache's current position). Speculative decoders use ``step`` with several
  draft tokens and ``KVCache.truncate`` to roll back.
"""

from __future__ import annotations

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
from tokenloom.generators.layers.rope import rope_table_1d, rope_table_2d
from tokenloom.heads import HEADS
from tokenloom.heads.base import Head
from tokenloom.tokens import Grid, Tokens, TokenSpec

ROPES = ("2d", "1d")


@register("raster_ar")
class RasterAR(TokenGenerator):
    """Llama-style decoder generating a :class:`Grid` of ``index`` tokens in raster order.

    Args:
        token_spec: ``TokenSpec.to_dict()`` of the tokens (kind ``"index"``, Grid layout).
        width, depth, num_heads, num_kv_heads: transformer size (``head_dim = width / num_heads``).
        mlp: ``"swiglu"`` | ``"gelu"`` | ``"gelu_tanh"``; ``multiple_of``/``ffn_dim_multiplier`` size SwiGLU
            (LlamaGen), ``mlp_ratio`` sizes GELU MLPs.
        norm_type, norm_eps: ``"rms"`` | ``"layer"`` and its epsilon.
        rope_type: ``"2d"`` (row/column, LlamaGen) or ``"1d"`` (raster index); ``rope_base`` its base;
            ``prefix_rope``: ``"zero"`` (LlamaGen: cos = sin = 0 on prefix rows) or ``"identity"``.
        fused_qkv: one ``wqkv`` projection.
        dropout: residual-branch dropout in every block; ``token_dropout``: dropout on the input sequence
            (prefix + token embeddings), as LlamaGen's ``resid/ffn_dropout_p`` and ``token_dropout_p``.
        condition: ``"class"`` (``num_classes``), ``"text"`` (``cond_dim``, ``cond_len``, optional
            ``text_hidden`` MLP width) or ``"none"``; ``cond_dropout``: training probability of the null condition.
        head: head name in the heads registry; ``head_options``: extra head arguments (e.g. ``{"bias": True}``).
            The head module is ``self.output_head`` (``self.head`` would read the config entry: diffusers'
            ``ModelMixin.__getattr__`` prefers config keys over sub-modules).
        initializer_range: std of the normal init of Linear/Embedding weights (the head starts at zero).
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
        rope_type: str = "2d",
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
    ):
        super().__init__()
        spec = TokenSpec.from_dict(token_spec)
        if isinstance(token_spec, TokenSpec):  # keep the config JSON-serialisable
            self.register_to_config(token_spec=spec.to_dict())
        head_cls = HEADS.get(head)
        if spec.kind not in head_cls.kinds:
            raise ValueError(f"head {head!r} ({head_cls.__name__}) models {head_cls.kinds} tokens but token_spec "
                             f"has kind={spec.kind!r}: {spec}")
        if spec.kind != "index" or not isinstance(spec.layout, Grid):
            raise ValueError(f"RasterAR generates 'index' tokens on a Grid layout for now, got kind={spec.kind!r} "
                             f"with layout {spec.layout}")
        if rope_type not in ROPES:
            raise ValueError(f"rope_type must be one of {ROPES}, got {rope_type!r}")
        if width % num_heads:
            raise ValueError(f"width must be divisible by num_heads, got width={width}, num_heads={num_heads}")

        self.prefix = make_prefix(condition, width, num_classes=num_classes, cond_dim=cond_dim, cond_len=cond_len,
                                  dropout=cond_dropout, text_hidden=text_hidden)
        self.tok_embeddings = nn.Embedding(spec.vocab_size, width)
        self.input_dropout = nn.Dropout(token_dropout)
        self.layers = nn.ModuleList(
            TransformerBlock(width, num_heads, num_kv_heads, mlp=mlp, multiple_of=multiple_of,
                             ffn_dim_multiplier=ffn_dim_multiplier, mlp_ratio=mlp_ratio, norm=norm_type,
                             norm_eps=norm_eps, fused_qkv=fused_qkv, dropout=dropout)
            for _ in range(depth)
        )
        self.norm = make_norm(norm_type, width, norm_eps)
        self.output_head = HEADS.build(head, spec=spec, width=width, **(head_options or {}))

        head_dim, p = width // num_heads, self.prefix.length
        if rope_type == "2d":
            table = rope_table_2d(spec.layout.h, spec.layout.w, head_dim, rope_base, p, prefix_rope)
        else:
            table = rope_table_1d(spec.length, head_dim, rope_base, p, prefix_rope)
        self.register_buffer("rope_table", table, persistent=False)  # [P + L, head_dim/2, 2]
        self._init_weights(initializer_range)

    def _init_weights(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
        proj = getattr(self.output_head, "proj", None)
        if isinstance(proj, nn.Linear):
            nn.init.zeros_(proj.weight)

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

    def _check_codes(self, codes: Tensor, max_len: int, name: str = "codes") -> Tensor:
        if not isinstance(codes, Tensor) or codes.dim() != 2 or codes.is_floating_point():
            raise TypeError(f"{name} must be an integer tensor [B, T], got {getattr(codes, 'shape', codes)!r}")
        if codes.shape[1] > max_len:
            raise ValueError(f"{name} may hold at most {max_len} tokens here, got {codes.shape[1]}")
        v = self.spec.vocab_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= v):
            raise ValueError(f"{name} values must lie in [0, {v - 1}], got [{int(codes.min())}, {int(codes.max())}]")
        return codes.long()

    def hidden(self, prefix: Prefix, codes: Tensor) -> Tensor:
        """Full (uncached) pass: ``prefix.x: [B, P, C]``, ``codes: [B, T]`` (``T <= L - 1``) → ``z: [B, T + 1, C]``.

        ``z[:, i]`` predicts ``c_i`` (the last prefix position predicts ``c_0``).
        """
        codes = self._check_codes(codes, self.spec.length - 1)
        x = torch.cat([prefix.x, self.tok_embeddings(codes).to(prefix.x.dtype)], dim=1)
        s = x.shape[1]
        mask = causal_mask(s, device=x.device)
        if prefix.key_valid is not None:
            ones = torch.ones(codes.shape, dtype=torch.bool, device=x.device)
            mask = with_key_padding(mask, torch.cat([prefix.key_valid, ones], dim=1))
        return self._run(x, 0, mask, None)[:, self.prefix_length - 1:]

    def full_logits(self, cond, codes: Tensor, guided: bool = False) -> Tensor:
        """Uncached logits ``[B', T + 1, depth, V]`` for ``codes: [B, T]`` (``B' = 2B`` with null rows if guided)."""
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
        """Feed ``codes: [B, T]`` at the cache's position → ``z: [B, T, C]``; ``z[:, i]`` predicts the next code."""
        start = cache.length
        if start < self.prefix_length:
            raise ValueError("step needs a cache filled by prefill first")
        codes = self._check_codes(codes, self.prefix_length + self.spec.length - start)
        t = codes.shape[1]
        cache.check_room(t)
        x = self.tok_embeddings(codes).to(cache.k.dtype)
        mask = None
        if t > 1 or cache.key_valid is not None:
            mask = causal_mask(t, start + t, device=x.device)
            if cache.key_valid is not None:
                mask = with_key_padding(mask, cache.key_valid[:, :start + t])
        return self._run(x, start, mask, cache)

    # ---------------------------------------------------------------- the two verbs
    def forward(self, tokens: Tokens, cond: Condition | Tensor | None = None, return_logits: bool = True) -> dict:
        """Teacher-forced training pass.

        Returns ``{"loss": scalar, "logits": [B, L, depth, V]}`` (logits only when ``return_logits`` and the head
        has them). Condition dropout applies in training mode.
        """
        self.check_tokens(tokens)
        b = tokens.batch_size
        cond = self.as_condition(cond, b if self.condition_kind == "none" else None)
        if cond.batch_size != b:
            raise ValueError(f"cond has batch size {cond.batch_size} but tokens have {b}")
        target = tokens.data  # [B, L, depth]
        z = self.hidden(self.embed_prefix(cond), target[:, :-1, 0])  # [B, L, C]
        z_flat = z.flatten(0, 1)
        out = {"loss": self.output_head.loss(z_flat, target.flatten(0, 1)).mean()}
        if return_logits and type(self.output_head).logits is not Head.logits:
            out["logits"] = self.output_head.logits(z_flat).unflatten(0, (b, -1))
        return out

    @torch.no_grad()
    def generate(
        self,
        cond: Condition | Tensor | None,
        params: SamplingParams | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decoding=None,
        progress: bool = False,
    ) -> Tokens:
        """Sample ``Tokens`` of this model's spec, one token per cached step, with classifier-free guidance.

        Args:
            cond: labels ``[B]``, a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            params: sampling params; the guidance scale of step ``t`` is ``params.at_step(t, L)``.
            generator: one ``torch.Generator`` or a list of ``B`` (row ``i`` then depends only on its own).
            decoding: reserved for speculative decoders; only None (one token per step) is supported.
            progress: show a tqdm bar.
        """
        if decoding is not None:
            raise ValueError(f"decoding must be None (plain one-token-per-step decoding) for RasterAR for now, "
                             f"got {decoding!r}")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        cond = self.as_condition(cond)
        b = cond.batch_size
        if isinstance(generator, (list, tuple)) and len(generator) != b:
            raise ValueError(f"generator must be one torch.Generator or a list of {b} (one per row), "
                             f"got a list of {len(generator)}")
        guided = params.uses_guidance
        if guided and self.condition_kind == "none":
            raise ValueError(f"guidance needs a conditional generator; this one has condition='none' "
                             f"(guidance_scale={params.guidance_scale})")
        was_training = self.training
        self.eval()  # no dropout while sampling, whatever mode the caller left the model in
        try:
            codes = self._decode(cond, params, generator, guided, progress)
        finally:
            self.train(was_training)
        return Tokens(codes, self.spec)

    def _decode(self, cond: Condition, params: SamplingParams, generator, guided: bool, progress: bool) -> Tensor:
        """One-token-per-step cached decoding → codes ``[B, L, depth]``."""
        b, length = cond.batch_size, self.spec.length
        prefix = self.embed_prefix(cond, guided, drop=False)
        cache = self.new_cache(prefix.x.shape[0])
        z = self.prefill(prefix, cache)  # [B or 2B, C]
        codes = torch.empty(b, length, self.spec.depth, dtype=torch.long, device=self.device)
        for t in tqdm(range(length), disable=not progress, desc="raster_ar", leave=False):
            p = params.at_step(t, length)
            z_uncond = z[b:] if guided and p.guidance_scale != 1.0 else None
            codes[:, t] = self.output_head.sample(z[:b], p, generator, z_uncond=z_uncond)
            if t + 1 < length:
                feed = codes[:, t, :1]
                z = self.step(torch.cat([feed, feed]) if guided else feed, cache)[:, 0]
        return codes
