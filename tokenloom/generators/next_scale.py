"""Next-scale autoregressive generator (VAR; Infinity's bitwise variant): one forward pass per scale.

Tokens follow a :class:`~tokenloom.tokens.Scales` layout: scale ``k`` is an ``h_k × w_k`` grid, flattened scale
after scale. Every token of scale ``k`` is predicted at once from everything coarser (block-causal attention: a
position sees all positions of its own and earlier scales).

Sequence (VAR): ``[sos_0..sos_{n_0-1}, in_1 .., in_{K-1} ..]`` where the ``n_0 = h_0·w_0`` start tokens are
``cond + pos_start`` and the inputs of scale ``k >= 1`` are ``word_embed`` of the tokenizer's *next-scale
inputs* (VAR: the running sum of upsampled code maps, area-downsampled to scale ``k``); every position then gets
``lvl_embed(scale) + pos_1LC`` (each optional). Position ``l`` predicts token ``l``. Conditioning:

* ``condition="class"`` — the class embedding (``num_classes + 1`` rows, the last = null class for guidance)
  is the adaLN condition and the start token (VAR);
* ``condition="text"`` — projected text features are a *prefix* of the sequence (seen by every scale, seeing
  only themselves and padding-masked) and their masked mean is the adaLN condition and the start token;
* ``condition="none"`` — a learned vector plays the class embedding (no guidance).

Blocks are adaLN blocks (:class:`~tokenloom.generators.next_scale_layers.AdaLNScaleBlock`), per-block or shared
modulation, optional l2-normalised attention with a learned per-head scale (VAR's ``attn_l2_norm``). The output
goes through an adaLN final norm (``head_nm``) and then the head (``categorical`` for index tokens, ``bitwise``
for bits, or a continuous head).

**The tokenizer is handed over, never imported.** Teacher forcing and sampling need the tokenizer's next-scale
inputs, so the generator works with a bound object obeying :class:`ScaleCodec`. Pipelines, trainers and tests call
``generator.bind_tokenizer(tokenizer)`` once (the tokenizer is kept by reference, outside the state dict, so it is
neither saved nor moved with the generator). ``forward`` also accepts precomputed ``inputs``.

Paths, compared in the tests: full (:meth:`NextScaleAR.hidden`, block-causal mask over the whole sequence) and
cached (:meth:`NextScaleAR.new_cache` + :meth:`NextScaleAR.step`, one call per scale, appending to a KV cache; the
text prefix rides with the first scale, so generation is exactly ``K`` forward passes).

Bitwise self-correction (Infinity, training option ``self_correction = p``): the teacher-forced inputs are built
scale by scale from *corrupted* tokens — each bit flipped with probability ``p`` (index tokens: replaced by a
uniform random code) on the first ``self_correction_scales`` scales — and the target of every later scale is the
tokenizer's re-quantisation of the residual left by those corrupted scales (``codec.quantize_scale(f - f_hat, k)``),
so the model learns to correct earlier mistakes. ``f`` is the tokenizer's continuous latent when ``forward`` gets
``latents``; otherwise it is the reconstruction ``f_hat`` of the clean tokens (the latent up to the tokenizer's final
quantisation error), and scale 0 keeps its clean target.

Zero-shot in/outpainting (``generate(..., known=Tokens, known_mask=[B, L])``, VAR §6): at every scale the known
tokens are teacher-forced in place of the sampled ones, so the next scale's input holds them.

Infinity coverage: the bitwise head, bitwise self-correction and text conditioning (prefix + pooled adaLN) are
here; Infinity's cross-attention to the text, its 2D RoPE over scales and its checkpoint format are not.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol, runtime_checkable

import torch
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn
from tqdm.auto import tqdm

from tokenloom.config import SamplingParams
from tokenloom.generators import register
from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.condition import Condition, as_condition
from tokenloom.generators.layers.adaln import AdaLNFinalNorm, AdaLNModulation
from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import block_causal_mask, with_key_padding
from tokenloom.generators.layers.prefix import Prefix, cat_prefixes, make_prefix
from tokenloom.generators.layers.rows import repeat_rows
from tokenloom.generators.next_scale_layers import AdaLNScaleBlock
from tokenloom.heads import HEADS
from tokenloom.tokens import Scales, Tokens, TokenSpec


@runtime_checkable
class ScaleCodec(Protocol):
    """What a next-scale generator needs from its multi-scale tokenizer (VAR's VQVAE quantiser, Infinity's BSQ).

    ``codes`` of one scale are ``[B, h_k·w_k, channels]`` token values in raster order (``index``: long codes,
    ``bits``: long 0/1, ``continuous``: floats); ``f_hat`` is the tokenizer's running reconstruction (opaque here).
    """

    spec: TokenSpec

    def teacher_inputs(self, tokens: Tokens) -> Tensor:
        """Next-scale inputs of scales ``1..K-1`` for teacher forcing: ``[B, L - h_0·w_0, C_in]`` (VAR's
        ``idxBl_to_var_input``)."""

    def next_input(self, f_hat: Tensor | None, k: int, codes: Tensor) -> tuple[Tensor, Tensor | None]:
        """Add scale ``k``'s ``codes`` to ``f_hat`` (None = nothing yet) → ``(f_hat, x_next)`` with ``x_next:
        [B, h_{k+1}·w_{k+1}, C_in]`` the input of scale ``k + 1`` (None after the last scale)."""


CONDITIONS = ("class", "text", "none")


class ScaleCondition(NamedTuple):
    """The condition of a batch as the backbone uses it."""

    vec: Tensor  # [B, C]: adaLN condition and start token
    prefix: Prefix | None  # text prefix tokens [B, P, C] (+ key validity), or None


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


@register("next_scale")
class NextScaleAR(TokenGenerator):
    """VAR-style next-scale generator over a :class:`Scales` layout; see the module docstring.

    Args:
        token_spec: ``TokenSpec.to_dict()``; the layout must be :class:`Scales`.
        input_dim: channels ``C_in`` of the tokenizer's next-scale inputs (VAR: ``Cvae``).
        width, depth, num_heads: transformer size (``head_dim = width / num_heads``).
        mlp_ratio: FFN hidden = ``round(width · mlp_ratio)``; ``norm_eps``: LayerNorm epsilon.
        attn_l2_norm: l2-normalised q/k with a learned, clamped per-head scale (VAR's ``attn_l2_norm``);
            ``attn_scale``: logit scale without it (None = ``1/sqrt(head_dim)``; VAR: ``0.25/sqrt(head_dim)``);
            ``qkv_bias``: learned q and v biases.
        shared_adaln: one modulation shared by all blocks plus a per-block offset (VAR's ``shared_aln``).
        pos_embed: learned absolute position embedding of every position (``pos_1LC``) and of the start tokens
            (``pos_start``); level_embed: learned embedding of each position's scale (``lvl_embed``).
        condition: ``"class"`` (``num_classes``), ``"text"`` (``cond_dim``, ``cond_len``, optional ``text_hidden``)
            or ``"none"``; ``cond_dropout``: training probability of the null condition.
        head, head_options: head name in the heads registry and extra arguments (VAR: ``{"bias": True}``). The head
            module is ``self.output_head``.
        self_correction: bitwise self-correction probability (training only; 0 = off), on the first
            ``self_correction_scales`` scales (None = all but the last).
        drop_path: stochastic depth, rising linearly to this value over the blocks (training only).
        init_std: std of the truncated-normal init (None = VAR's ``sqrt(1 / (3·width))``); ``init_head``,
            ``init_adaln``, ``init_adaln_gamma``: VAR's multipliers of the head weight, the adaLN scale/shift rows and
            the adaLN gate rows (``1e-5`` makes every block start as the identity).
    """

    @register_to_config
    def __init__(
        self,
        token_spec: dict,
        input_dim: int = 8,
        width: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = True,
        attn_scale: float | None = None,
        qkv_bias: bool = True,
        shared_adaln: bool = False,
        pos_embed: bool = True,
        level_embed: bool = True,
        condition: str = "class",
        num_classes: int | None = None,
        cond_dim: int | None = None,
        cond_len: int | None = None,
        cond_dropout: float = 0.1,
        text_hidden: int | None = None,
        head: str = "categorical",
        head_options: dict | None = None,
        self_correction: float = 0.0,
        self_correction_scales: int | None = None,
        drop_path: float = 0.0,
        init_std: float | None = None,
        init_head: float = 0.02,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
    ):
        super().__init__()
        spec = TokenSpec.from_dict(token_spec)
        if isinstance(token_spec, TokenSpec):  # keep the config JSON-serialisable
            self.register_to_config(token_spec=spec.to_dict())
        if not isinstance(spec.layout, Scales):
            raise ValueError(f"NextScaleAR needs a Scales layout (a coarse-to-fine pyramid), got token_spec layout "
                             f"{spec.layout}")
        head_cls = HEADS.get(head)
        if spec.kind not in head_cls.kinds:
            raise ValueError(f"head {head!r} ({head_cls.__name__}) models {head_cls.kinds} tokens but token_spec "
                             f"has kind={spec.kind!r}: {spec}")
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        for name, value in (("input_dim", input_dim), ("width", width), ("depth", depth), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if width % num_heads:
            raise ValueError(f"width must be divisible by num_heads, got width={width}, num_heads={num_heads}")
        for name, value in (("attn_l2_norm", attn_l2_norm), ("qkv_bias", qkv_bias), ("shared_adaln", shared_adaln),
                            ("pos_embed", pos_embed), ("level_embed", level_embed)):
            _bool(name, value)
        if not 0.0 <= self_correction < 1.0:
            raise ValueError(f"self_correction must lie in [0, 1), got {self_correction!r}")
        k = spec.layout.num_scales
        if self_correction_scales is not None and not 0 <= self_correction_scales <= k:
            raise ValueError(f"self_correction_scales must be None or in [0, {k}], got {self_correction_scales!r}")

        layout = spec.layout
        self.first_l = layout.sizes[0][0] * layout.sizes[0][1]
        self.cond_embed = make_prefix(condition, width, num_classes=num_classes, cond_dim=cond_dim,
                                      cond_len=cond_len, dropout=cond_dropout, text_hidden=text_hidden)
        self.word_embed = nn.Linear(input_dim, width)
        if pos_embed:
            self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, width))
            self.pos_1LC = nn.Parameter(torch.zeros(1, spec.length, width))
        if level_embed:
            self.lvl_embed = nn.Embedding(k, width)
        self.register_buffer("scale_index", layout.scale_of_position(), persistent=False)  # [L]
        self.shared_ada_lin = AdaLNModulation(width, width, 6) if shared_adaln else None
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(
            AdaLNScaleBlock(width, num_heads, width, mlp_ratio=mlp_ratio, norm_eps=norm_eps, shared_adaln=shared_adaln,
                            l2_norm=attn_l2_norm, attn_scale=attn_scale, qkv_bias=qkv_bias, drop_path=rates[i])
            for i in range(depth)
        )
        self.head_nm = AdaLNFinalNorm(width, width, norm_eps)
        self.output_head = HEADS.build(head, spec=spec, width=width, **(head_options or {}))
        self._codec: tuple = ()  # the bound tokenizer, kept out of the module tree (not saved, not moved)
        self._init_weights()

    def _init_weights(self) -> None:
        """VAR's init: truncated normal, zero biases, small head, adaLN gates near zero (configurable)."""
        cfg, c = self.config, self.config.width
        std = math.sqrt(1 / c / 3) if cfg.init_std is None else cfg.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        for name in ("pos_start", "pos_1LC"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=std)
        with torch.no_grad():
            proj = getattr(self.output_head, "proj", None)
            if isinstance(proj, nn.Linear):
                proj.weight.mul_(cfg.init_head)
            self.head_nm.ada_lin[1].weight.mul_(cfg.init_adaln)
            mods = [b.ada_lin[1] for b in self.blocks if not b.shared_adaln]
            if self.shared_ada_lin is not None:
                mods.append(self.shared_ada_lin[1])
            for lin in mods:
                lin.weight[2 * c:].mul_(cfg.init_adaln)
                lin.weight[:2 * c].mul_(cfg.init_adaln_gamma)
            for b in self.blocks:
                b.attn.proj.weight.div_(math.sqrt(2 * cfg.depth))
                b.ffn.fc2.weight.div_(math.sqrt(2 * cfg.depth))

    # ---------------------------------------------------------------- tokenizer binding
    def bind_tokenizer(self, tokenizer: ScaleCodec) -> NextScaleAR:
        """Use ``tokenizer`` (a :class:`ScaleCodec`) for next-scale inputs; its ``spec`` must equal this model's."""
        missing = [m for m in ("teacher_inputs", "next_input") if not callable(getattr(tokenizer, m, None))]
        if missing:
            raise TypeError(f"tokenizer must provide the ScaleCodec methods teacher_inputs and next_input; "
                            f"{type(tokenizer).__name__} lacks {missing}")
        if getattr(tokenizer, "spec", None) != self.spec:
            raise ValueError(f"tokenizer.spec {getattr(tokenizer, 'spec', None)} does not match the generator's "
                             f"token_spec {self.spec}")
        self._codec = (tokenizer,)
        return self

    @property
    def codec(self) -> ScaleCodec:
        if not self._codec:
            raise RuntimeError("NextScaleAR needs its multi-scale tokenizer for next-scale inputs: call "
                               "generator.bind_tokenizer(tokenizer) first (pipelines do this when they are built)")
        return self._codec[0]

    # ---------------------------------------------------------------- layout helpers
    @property
    def condition_kind(self) -> str:
        return self.config.condition

    @property
    def scale_sizes(self) -> list[int]:
        """``[n_0, ..., n_{K-1}]``: tokens per scale."""
        return [h * w for h, w in self.spec.layout.sizes]

    @property
    def prefix_length(self) -> int:
        """``P``: text prefix positions in the sequence (0 unless ``condition="text"``)."""
        return self.cond_embed.length if self.condition_kind == "text" else 0

    def _check_inputs(self, x_in: Tensor, batch: int, length: int | None = None, name: str = "inputs") -> Tensor:
        length = self.spec.length - self.first_l if length is None else length
        want = (batch, length, self.config.input_dim)
        if not isinstance(x_in, Tensor) or not x_in.is_floating_point() or tuple(x_in.shape) != want:
            raise ValueError(f"{name} must be a float tensor of shape {list(want)} ([B, L - first_l, input_dim]), "
                             f"got {getattr(x_in, 'dtype', type(x_in))} {tuple(getattr(x_in, 'shape', ()))}")
        return x_in

    # ---------------------------------------------------------------- conditions
    def as_condition(self, cond, batch_size: int | None = None) -> Condition:
        """Accept a Condition, ``[B]`` labels, ``[B, Lc, Cc]`` features or None; check it fits this model."""
        if cond is None and batch_size is None:
            raise TypeError("cond must be a Condition (Condition(batch=B) for condition='none'), got None")
        return self.cond_embed.check(as_condition(cond, batch_size))

    def _vec_and_prefix(self, prefix: Prefix) -> ScaleCondition:
        if self.condition_kind != "text":
            return ScaleCondition(prefix.x[:, 0], None)
        x, valid = prefix.x, prefix.key_valid
        if valid is None:
            return ScaleCondition(x.mean(1), prefix)
        w = valid.to(x.dtype)[..., None]
        return ScaleCondition((x * w).sum(1) / w.sum(1).clamp_min(1.0), prefix)

    def condition_state(self, cond: Condition, guided: bool = False, drop: bool | None = None) -> ScaleCondition:
        """The condition vector ``[B, C]`` (and text prefix); with ``guided`` the null rows follow (``[2B, C]``).

        The null rows are the learned null condition, or ``cond.uncond_features`` (negative prompt) when set.
        """
        cond = self.cond_embed.check(cond.to(self.device))
        prefix = self.cond_embed(cond, drop=drop)
        if guided:
            if getattr(cond, "uncond_features", None) is not None:
                negative = Condition(features=cond.uncond_features, mask=cond.uncond_mask)
                null = self.cond_embed(negative, drop=False)
            else:
                null = self.cond_embed.null(cond.batch_size, self.device)
            prefix = cat_prefixes(prefix, null)
        return self._vec_and_prefix(prefix)

    def modulations(self, vec: Tensor) -> list[Tensor]:
        """Per-block adaLN modulation ``[B, 1, 6, C]`` from the condition vector ``vec: [B, C]``."""
        shared = vec if self.shared_ada_lin is None else self.shared_ada_lin(vec)
        return [b.modulation(shared) for b in self.blocks]

    # ---------------------------------------------------------------- embeddings
    def _position_embedding(self, start: int, end: int) -> Tensor | None:
        """``lvl_embed + pos_1LC`` of positions ``start..end-1`` → ``[1, end - start, C]`` (None if neither)."""
        out = None
        if self.config.level_embed:
            out = self.lvl_embed(self.scale_index[start:end])[None]
        if self.config.pos_embed:
            pos = self.pos_1LC[:, start:end]
            out = pos if out is None else out + pos
        return out

    def start_tokens(self, vec: Tensor) -> Tensor:
        """The first scale's input: ``vec + pos_start + lvl/pos`` → ``[B, n_0, C]``."""
        x = vec[:, None].expand(-1, self.first_l, -1)
        if self.config.pos_embed:
            x = x + self.pos_start
        pos = self._position_embedding(0, self.first_l)
        return x if pos is None else x + pos

    def input_tokens(self, x_in: Tensor, start: int) -> Tensor:
        """``word_embed(x_in) + lvl/pos`` for next-scale inputs ``x_in: [B, T, C_in]`` at positions ``start..``."""
        x = self.word_embed(x_in.to(self.word_embed.weight.dtype))
        pos = self._position_embedding(start, start + x.shape[1])
        return x if pos is None else x + pos

    # ---------------------------------------------------------------- backbone
    def _run(self, x: Tensor, ada: list[Tensor], mask: Tensor | None, cache: KVCache | None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, ada[i], mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(x.shape[1])
        return x

    def hidden(self, state: ScaleCondition, x_in: Tensor) -> Tensor:
        """Full (uncached) pass: ``x_in: [B, L - n_0, C_in]`` teacher-forced inputs → ``z: [B, L, C]``.

        ``z[:, l]`` (after ``head_nm``) predicts token ``l``. The mask is block-causal over ``[prefix, scales]``.
        """
        b = state.vec.shape[0]
        x_in = self._check_inputs(x_in, b)
        x = torch.cat([self.start_tokens(state.vec), self.input_tokens(x_in, self.first_l)], dim=1)
        sizes, p = self.scale_sizes, self.prefix_length
        if p:
            x = torch.cat([state.prefix.x.to(x.dtype), x], dim=1)
            sizes = [p, *sizes]
        mask = block_causal_mask(sizes, device=x.device)
        if p and state.prefix.key_valid is not None:
            ones = torch.ones(b, self.spec.length, dtype=torch.bool, device=x.device)
            mask = with_key_padding(mask, torch.cat([state.prefix.key_valid, ones], dim=1))
        x = self._run(x, self.modulations(state.vec), mask, None)
        return self.head_nm(x[:, p:], state.vec)

    def full_logits(self, cond, x_in: Tensor, guided: bool = False) -> Tensor:
        """Uncached logits ``[B', L, channels, V]`` (``B' = 2B`` with the null rows when ``guided``)."""
        state = self.condition_state(self.as_condition(cond), guided, drop=False)
        if guided:
            x_in = torch.cat([x_in, x_in])
        z = self.hidden(state, x_in)
        return self.output_head.logits(z.flatten(0, 1)).unflatten(0, z.shape[:2])

    # ---------------------------------------------------------------- cached decoding
    def new_cache(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> KVCache:
        """An append-style KV cache for ``batch_size`` rows holding the prefix and every scale (``P + L``)."""
        attn = self.blocks[0].attn
        return KVCache(len(self.blocks), batch_size, attn.num_heads, self.prefix_length + self.spec.length,
                       attn.head_dim, dtype=dtype or self.dtype, device=device or self.device)

    def step(self, x: Tensor, k: int, state: ScaleCondition, ada: list[Tensor], cache: KVCache) -> Tensor:
        """One forward pass for scale ``k``: embedded inputs ``x: [B, n_k, C]`` → ``z: [B, n_k, C]``.

        Scale 0 must come first on an empty cache (``x`` from :meth:`start_tokens`; the text prefix is prepended
        here); scale ``k`` then attends to everything cached and itself. ``ada`` is :meth:`modulations` of
        ``state.vec``.
        """
        sizes, p = self.scale_sizes, self.prefix_length
        if not 0 <= k < len(sizes) or tuple(x.shape[1:]) != (sizes[k], self.config.width):
            raise ValueError(f"step needs scale k in [0, {len(sizes)}) with x of shape [B, n_k, {self.config.width}],"
                             f" got k={k}, x {tuple(x.shape)}")
        expected = 0 if k == 0 else p + sum(sizes[:k])
        if cache.length != expected or cache.batch_size != x.shape[0]:
            raise ValueError(f"scale {k} needs a cache of {x.shape[0]} rows holding {expected} positions, got "
                             f"{cache.batch_size} rows holding {cache.length}")
        mask = None
        if k == 0:
            if p:
                x = torch.cat([state.prefix.x.to(x.dtype), x], dim=1)
                mask = block_causal_mask([p, sizes[0]], device=x.device)
                if state.prefix.key_valid is not None:
                    cache.key_valid = torch.ones(cache.batch_size, cache.max_length, dtype=torch.bool,
                                                 device=x.device)
                    cache.key_valid[:, :p] = state.prefix.key_valid
        end = cache.length + x.shape[1]
        if cache.key_valid is not None:
            if mask is None:
                mask = torch.ones(x.shape[1], end, dtype=torch.bool, device=x.device)
            mask = with_key_padding(mask, cache.key_valid[:, :end])
        x = self._run(x, ada, mask, cache)
        return self.head_nm(x[:, p:] if k == 0 else x, state.vec)

    # ---------------------------------------------------------------- training
    def _corrupt(self, codes: Tensor, prob: float) -> Tensor:
        """Self-correction noise: flip bits / replace codes with a uniform random code, each with ``prob``."""
        hit = torch.rand(codes.shape, device=codes.device) < prob
        if self.spec.kind == "bits":
            return torch.where(hit, 1 - codes, codes)
        if self.spec.kind == "index":
            return torch.where(hit, torch.randint_like(codes, self.spec.vocab_size), codes)
        raise ValueError(f"self_correction needs 'bits' or 'index' tokens, got kind={self.spec.kind!r}")

    def self_corrected(self, tokens: Tokens, latents: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Bitwise self-correction (see the module docstring) → ``(targets [B, L, ch], inputs [B, L - n_0, C_in])``.

        Needs ``codec.quantize_scale(f_rest, k) -> [B, n_k, ch]``: the tokenizer's quantisation of the residual
        latent ``f_rest`` at scale ``k``.
        """
        codec, sizes = self.codec, self.scale_sizes
        if not callable(getattr(codec, "quantize_scale", None)):
            raise TypeError(f"self_correction needs tokenizer.quantize_scale(f_rest, k); {type(codec).__name__} "
                            "does not provide it")
        offsets = self.spec.layout.offsets()
        clean = [tokens.data[:, offsets[k]:offsets[k + 1]] for k in range(len(sizes))]
        if latents is None:
            f = None
            for k, codes in enumerate(clean):
                f, _ = codec.next_input(f, k, codes)
        else:
            f = latents
        last = len(sizes) - 1
        noisy = last if self.config.self_correction_scales is None else self.config.self_correction_scales
        f_hat, targets, inputs = None, [], []
        for k in range(len(sizes)):
            if k == 0 and latents is None:
                codes = clean[0]
            else:
                codes = codec.quantize_scale(f if f_hat is None else f - f_hat, k).to(clean[k].dtype)
            targets.append(codes)
            if k == last:
                break
            fed = self._corrupt(codes, self.config.self_correction) if k < noisy else codes
            f_hat, x_next = codec.next_input(f_hat, k, fed)
            inputs.append(x_next)
        return torch.cat(targets, 1), torch.cat(inputs, 1)

    def forward(self, tokens: Tokens, cond: Condition | Tensor | None = None, inputs: Tensor | None = None,
                latents: Tensor | None = None, return_logits: bool = True) -> dict:
        """Teacher-forced training pass → ``{"loss": scalar, "logits": [B, L, channels, V]}``.

        Args:
            tokens: the target tokens.
            cond: labels ``[B]``, text features or a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            inputs: precomputed next-scale inputs ``[B, L - n_0, C_in]``; None = ``codec.teacher_inputs(tokens)``.
                Self-correction (training mode, ``self_correction > 0``) builds its own inputs and ignores them.
            latents: the tokenizer's continuous latent, used by self-correction (optional, see module docstring).
            return_logits: also return the logits (categorical and bitwise heads).

        Condition dropout and self-correction apply in training mode only.
        """
        self.check_tokens(tokens)
        b = tokens.batch_size
        cond = self.as_condition(cond, b if self.condition_kind == "none" else None)
        if cond.batch_size != b:
            raise ValueError(f"cond has batch size {cond.batch_size} but tokens have {b}")
        target = tokens.data
        if self.training and self.config.self_correction > 0:
            with torch.no_grad():
                target, inputs = self.self_corrected(tokens, latents)
        elif inputs is None:
            with torch.no_grad():
                inputs = self.codec.teacher_inputs(tokens)
        z = self.hidden(self.condition_state(cond), self._check_inputs(inputs, b))
        z_flat = z.flatten(0, 1)
        out = {"loss": self.output_head.loss(z_flat, target.flatten(0, 1)).mean()}
        if return_logits and hasattr(self.output_head, "sample_logits"):
            out["logits"] = self.output_head.logits(z_flat).unflatten(0, (b, -1))
        return out

    # ---------------------------------------------------------------- sampling
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
    ) -> Tokens:
        """Sample ``Tokens`` scale by scale: one cached forward pass per scale, guidance by batch doubling.

        Args:
            cond: labels ``[B]``, text features or a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            params: sampling params; scale ``k`` of ``K`` uses ``params.at_step(k, K)`` (VAR's ramp: see
                :func:`tokenloom.interop.var.var_sampling_params`). Per-row tensors have one value per image.
            generator: one ``torch.Generator`` or a list of ``B`` (image ``i`` then depends only on its own).
            decoding: must be None (next-scale decoding is already parallel within a scale).
            progress: show a tqdm bar over scales.
            known, known_mask: in/outpainting (VAR's zero-shot editing) — ``Tokens`` of this spec and ``[B, L]`` bool
                (True = keep, over every scale). At each scale the known tokens are teacher-forced: they replace the
                sampled ones before the scale feeds the next, and come back unchanged.
        """
        if decoding is not None:
            raise ValueError(f"decoding must be None for NextScaleAR (all tokens of a scale are drawn at once), "
                             f"got {decoding!r}")
        cond, params = self.check_generate_args(cond, params, generator)
        b = cond.batch_size
        guided = params.uses_guidance
        if (known is None) != (known_mask is None):
            raise ValueError("known and known_mask go together: pass both (inpainting) or neither")
        if known is not None:
            self.check_tokens(known, "known")
            if known.batch_size != b or not isinstance(known_mask, Tensor) or known_mask.dtype != torch.bool \
                    or known_mask.shape != (b, self.spec.length):
                raise ValueError(f"known must have {b} rows and known_mask must be a bool tensor of shape "
                                 f"[{b}, {self.spec.length}] (True = known), got {known.batch_size} rows and "
                                 f"{getattr(known_mask, 'dtype', type(known_mask).__name__)} "
                                 f"{tuple(getattr(known_mask, 'shape', ()))}")
            known_mask = known_mask.to(self.device)
        codec = self.codec
        state = self.condition_state(cond, guided, drop=False)
        ada = self.modulations(state.vec)
        cache = self.new_cache(state.vec.shape[0])
        sizes, offsets = self.scale_sizes, self.spec.layout.offsets()
        dtype = torch.float32 if self.spec.kind == "continuous" else torch.long
        out = torch.empty(b, self.spec.length, self.spec.channels, dtype=dtype, device=self.device)
        x, f_hat = self.start_tokens(state.vec), None
        for k in tqdm(range(len(sizes)), disable=not progress, desc="next_scale", leave=False):
            z = self.step(x, k, state, ada, cache)
            p = params.at_step(k, len(sizes))
            z_uncond = z[b:].flatten(0, 1) if guided and p.guidance_scale != 1.0 else None
            p, gens = repeat_rows(p, generator, sizes[k])
            codes = self.output_head.sample(z[:b].flatten(0, 1), p, gens, z_uncond=z_uncond)
            codes = codes.view(b, sizes[k], -1).to(dtype)
            if known is not None:  # VAR's masked teacher forcing: known tokens replace the sampled ones
                at = slice(offsets[k], offsets[k + 1])
                codes = torch.where(known_mask[:, at, None], known.data[:, at].to(codes), codes)
            out[:, offsets[k]:offsets[k + 1]] = codes
            if k + 1 < len(sizes):
                f_hat, x_in = codec.next_input(f_hat, k, codes)
                x_in = self._check_inputs(x_in, b, sizes[k + 1], name=f"next-scale input of scale {k + 1}")
                x = self.input_tokens(x_in, offsets[k + 1])
                if guided:
                    x = torch.cat([x, x])
        return Tokens(out, self.spec)
