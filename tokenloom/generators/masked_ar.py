"""Masked autoregressive generator (MAR): a bidirectional encoder–decoder that reveals tokens in a random order.

Architecture (MAR's ``models/mar.py``, fixtures README §7; module names are MAR's, so its checkpoints load by name):

* Tokens: the tokenizer's ``[B, h·w·p², c]`` grid is cut into ``p × p`` patches (``patch_size``), giving
  ``L = h·w`` tokens of ``c·p²`` values (:func:`~tokenloom.generators.masked_ar_layers.patchify`). Continuous and
  ``bits`` tokens enter through ``z_proj`` (Linear); ``index`` tokens through ``tok_embeddings`` (one table per
  codebook, summed).
* Buffer: ``buffer_size`` positions in front of the tokens hold the condition. ``"class"``: every buffer position
  is the class embedding ``class_emb(label)`` (``num_classes`` rows); the null condition is the separate learned
  ``fake_latent`` (label ``num_classes`` selects it too). ``"text"``: the first ``cond_len`` positions are the
  projected text features (:class:`~tokenloom.generators.layers.prefix.TextPrefix`, padding keys masked), the
  remaining ``buffer_size − cond_len`` the masked mean of them; the null condition is the prefix's learned null
  features (or ``Condition.uncond_features``). ``"none"``: every position is ``fake_latent``.
* Encoder: ``x = z_proj_ln([buffer, embed(tokens)] + encoder_pos_embed_learned)``; only the buffer and the
  *visible* tokens are kept (buffer first, then visible tokens by increasing position); ``encoder_depth`` timm ViT
  blocks (pre-norm LayerNorm ``norm_eps``, qkv bias, exact GELU MLP of ``mlp_ratio``, no attention mask except text
  padding); ``encoder_norm``.
* Decoder: ``decoder_embed`` (De → Dd); masked positions are filled with ``mask_token``; ``+
  decoder_pos_embed_learned``; ``decoder_depth`` blocks; ``decoder_norm``; the buffer is dropped and
  ``diffusion_pos_embed_learned`` added → ``z: [B, L, Dd]``, one vector per token for the head.

Mask convention: ``mask: [B, L]`` bool, True = masked (unknown); every row masks the same number of positions.

Training (``forward``): per row a random order; one mask ratio per batch from a normal(1, ``mask_ratio_std``)
truncated to ``[mask_ratio_min, 1]``; the first ``ceil(L·ratio)`` positions of each order are masked; in training
mode each row's condition becomes the null one with probability ``cond_dropout``. Loss = the head's loss averaged
over the masked positions (for the diffusion head that equals MAR's mask-weighted mean over
``diffusion_batch_mul`` repeats).

Generation and inpainting (``generate``) are described in :mod:`~tokenloom.generators.masked_ar_generate`; the
condition buffer in :mod:`~tokenloom.generators.masked_ar_condition`. The class joins them as mixins.

Written on timm's ViT ``Block`` (MAR uses it) rather than tokenloom's Llama block: MAR's keys (``norm1``,
``attn.qkv``, ``mlp.fc1`` …) then load unchanged.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from diffusers.configuration_utils import register_to_config
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from tokenloom.generators import register
from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.condition import Condition
from tokenloom.generators.layers.prefix import Prefix, TextPrefix
from tokenloom.generators.masked_ar_condition import CONDITIONS, MaskedARConditioning
from tokenloom.generators.masked_ar_generate import MaskedARGeneration
from tokenloom.generators.masked_ar_layers import (
    check_num_steps,
    first_of_order,
    patchify,
    random_orders,
    sample_mask_ratio,
    unpatchify,
)
from tokenloom.heads import HEADS
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

REVEALS = ("order", "confidence")
Z_PROJ_LN_EPS = 1e-6  # MAR hard-codes it, whatever the blocks' norm_layer


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _fraction(name: str, value, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


@register("masked_ar")
class MaskedAR(MaskedARConditioning, MaskedARGeneration, TokenGenerator):
    """MAR-style masked autoregressive generator; see the module docstring.

    Args:
        token_spec: ``TokenSpec.to_dict()`` of the tokenizer's tokens (Grid or Sequence layout).
        patch_size: ``p``: continuous tokens are grouped in ``p × p`` patches (Grid layouts only; MAR: 1).
        encoder_width, encoder_depth, encoder_num_heads: the encoder ViT (MAR ``encoder_embed_dim`` …).
        decoder_width, decoder_depth, decoder_num_heads: the decoder ViT; the head reads ``decoder_width``.
        mlp_ratio: ViT MLP hidden = ``int(width · mlp_ratio)``.
        norm_eps: LayerNorm epsilon of the blocks and the encoder/decoder norms (MAR: 1e-6).
        attn_dropout, proj_dropout: ViT dropouts in training (MAR: 0.1 each).
        buffer_size: condition positions in front of the tokens (MAR: 64).
        condition: ``"class"`` (``num_classes``), ``"text"`` (``cond_dim``, ``cond_len``, optional ``text_hidden``
            MLP width) or ``"none"``.
        cond_dropout: training probability of the null condition (MAR ``label_drop_prob``).
        mask_ratio_min, mask_ratio_std: the training mask ratio's truncated normal (MAR: 0.7, 0.25).
        reveal: ``"order"`` (MAR) or ``"confidence"`` (MaskGIT; needs a head with logits).
        remask_temperature: MaskGIT's ``choice_temperature`` (Gumbel noise on the confidence), ``reveal="confidence"``.
        num_steps: default iterations when ``params.num_steps`` is None (None: ``min(64, L)``).
        head: head name (``"diffusion"``, ``"flow"``, ``"categorical"``, ``"bitwise"``); ``head_options``: its extra
            arguments (e.g. ``{"depth": 3, "mlp_width": 1024, "num_sampling_steps": 100}``). The module is
            ``self.output_head`` (diffusers' ``__getattr__`` would return the config's ``head`` string).
    """

    @register_to_config
    def __init__(
        self,
        token_spec: dict,
        patch_size: int = 1,
        encoder_width: int = 256,
        encoder_depth: int = 4,
        encoder_num_heads: int = 4,
        decoder_width: int = 256,
        decoder_depth: int = 4,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        attn_dropout: float = 0.1,
        proj_dropout: float = 0.1,
        buffer_size: int = 64,
        condition: str = "class",
        num_classes: int | None = None,
        cond_dim: int | None = None,
        cond_len: int | None = None,
        cond_dropout: float = 0.1,
        text_hidden: int | None = None,
        mask_ratio_min: float = 0.7,
        mask_ratio_std: float = 0.25,
        reveal: str = "order",
        remask_temperature: float = 4.5,
        num_steps: int | None = None,
        head: str = "diffusion",
        head_options: dict | None = None,
    ):
        super().__init__()
        spec = TokenSpec.from_dict(token_spec)
        if isinstance(token_spec, TokenSpec):  # keep the config JSON-serialisable
            self.register_to_config(token_spec=spec.to_dict())
        head_cls = HEADS.get(head)
        if spec.kind not in head_cls.kinds:
            raise ValueError(f"head {head!r} ({head_cls.__name__}) models {head_cls.kinds} tokens but token_spec has "
                             f"kind={spec.kind!r}: {spec}")
        if not isinstance(spec.layout, (Grid, Sequence)):
            raise ValueError(f"MaskedAR generates tokens on a Grid or Sequence layout, got {spec.layout}")
        p = _positive_int("patch_size", patch_size)
        if p > 1 and (spec.kind != "continuous" or not isinstance(spec.layout, Grid)
                      or spec.layout.h % p or spec.layout.w % p):
            raise ValueError(f"patch_size={p} needs continuous tokens on a Grid whose sides it divides, got {spec}")
        for name, value in (("encoder_width", encoder_width), ("encoder_depth", encoder_depth),
                            ("decoder_width", decoder_width), ("decoder_depth", decoder_depth),
                            ("buffer_size", buffer_size)):
            _positive_int(name, value)
        for side, width, heads in (("encoder", encoder_width, encoder_num_heads),
                                   ("decoder", decoder_width, decoder_num_heads)):
            if _positive_int(f"{side}_num_heads", heads) and width % heads:
                raise ValueError(f"{side}_width must be divisible by {side}_num_heads, got {width} and {heads}")
        if condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
        if reveal not in REVEALS:
            raise ValueError(f"reveal must be one of {REVEALS}, got {reveal!r}")
        if reveal == "confidence" and spec.kind == "continuous":
            raise ValueError(f"reveal='confidence' ranks sampled tokens by their probability, which head {head!r} "
                             f"({head_cls.__name__}, continuous tokens) does not give; use reveal='order'")
        _fraction("cond_dropout", cond_dropout, 0.0, 0.999999)
        _fraction("mask_ratio_min", mask_ratio_min)
        if isinstance(mask_ratio_std, bool) or not isinstance(mask_ratio_std, (int, float)) or mask_ratio_std <= 0:
            raise ValueError(f"mask_ratio_std must be a number > 0, got {mask_ratio_std!r}")
        if isinstance(remask_temperature, bool) or not isinstance(remask_temperature, (int, float)) \
                or not math.isfinite(remask_temperature) or remask_temperature < 0:
            raise ValueError(f"remask_temperature must be a finite number >= 0, got {remask_temperature!r}")

        if isinstance(spec.layout, Grid):
            self.grid = (spec.layout.h // p, spec.layout.w // p)
            self.seq_len = self.grid[0] * self.grid[1]
        else:
            self.grid, self.seq_len = None, spec.length
        if num_steps is not None:
            check_num_steps(num_steps, self.seq_len)
        if spec.kind == "continuous":
            layout = Grid(*self.grid) if self.grid is not None else spec.layout
            self.patch_spec = TokenSpec(kind="continuous", dim=spec.dim * p * p, layout=layout)
        else:
            self.patch_spec = spec
        self.token_dim = self.patch_spec.channels
        de, dd, total = encoder_width, decoder_width, buffer_size + self.seq_len

        # condition
        if condition == "class":
            _positive_int("num_classes (condition='class')", num_classes)
            self.class_emb = nn.Embedding(num_classes, de)
        if condition in ("class", "none"):
            self.fake_latent = nn.Parameter(torch.zeros(1, de))
        else:
            self.text_prefix = TextPrefix(de, cond_dim, cond_len, dropout=cond_dropout, hidden=text_hidden)
            if cond_len > buffer_size:
                raise ValueError(f"condition='text' places cond_len={cond_len} text tokens in the buffer, so "
                                 f"buffer_size must be >= cond_len, got buffer_size={buffer_size}")

        # encoder
        if spec.kind == "index":
            self.tok_embeddings = nn.Embedding(spec.vocab_size * spec.depth, de)
            self.register_buffer("code_offsets", torch.arange(spec.depth) * spec.vocab_size, persistent=False)
        else:
            self.z_proj = nn.Linear(self.token_dim, de)
        self.z_proj_ln = nn.LayerNorm(de, eps=Z_PROJ_LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, de))
        norm = partial(nn.LayerNorm, eps=norm_eps)
        self.encoder_blocks = nn.ModuleList(
            Block(de, encoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm, proj_drop=proj_dropout,
                  attn_drop=attn_dropout) for _ in range(encoder_depth))
        self.encoder_norm = norm(de)

        # decoder
        self.decoder_embed = nn.Linear(de, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, total, dd))
        self.decoder_blocks = nn.ModuleList(
            Block(dd, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm, proj_drop=proj_dropout,
                  attn_drop=attn_dropout) for _ in range(decoder_depth))
        self.decoder_norm = norm(dd)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, self.seq_len, dd))
        self._init_backbone()

        self.output_head = HEADS.build(head, spec=self.patch_spec, width=dd, **(head_options or {}))
        if reveal == "confidence" and not hasattr(self.output_head, "sample_logits"):
            raise ValueError(f"reveal='confidence' needs a head with logits, got head {head!r}")

    def _init_backbone(self) -> None:
        """MAR's ``initialize_weights`` on the backbone (heads keep their own initialisation)."""
        for param in (self.mask_token, self.encoder_pos_embed_learned, self.decoder_pos_embed_learned,
                      self.diffusion_pos_embed_learned, getattr(self, "fake_latent", None)):
            if param is not None:
                nn.init.normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    # ---------------------------------------------------------------- layout
    @property
    def device(self) -> torch.device:
        """The parameters' device (diffusers' ``ModelMixin.device`` walks every parameter on each call)."""
        return self.diffusion_pos_embed_learned.device

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_pos_embed_learned.dtype

    @property
    def condition_kind(self) -> str:
        return self.config.condition

    @property
    def buffer_size(self) -> int:
        return self.config.buffer_size

    @property
    def default_num_steps(self) -> int:
        return self.config.num_steps if self.config.num_steps is not None else min(64, self.seq_len)

    def to_patches(self, tokens: Tokens) -> Tensor:
        """``Tokens`` of this spec → the backbone's tokens ``[B, L, token_dim]`` (patched when ``patch_size > 1``)."""
        data, p = tokens.data, self.config.patch_size
        if p == 1:
            return data
        h, w = self.spec.layout.h, self.spec.layout.w
        return patchify(data.transpose(1, 2).reshape(data.shape[0], -1, h, w), p)

    def from_patches(self, x: Tensor) -> Tensor:
        """The backbone's tokens ``[B, L, token_dim]`` → ``Tokens.data`` of this spec."""
        p = self.config.patch_size
        if p == 1:
            return x
        latent = unpatchify(x, self.spec.dim, self.grid[0], self.grid[1], p)
        return latent.flatten(2).transpose(1, 2)

    # ---------------------------------------------------------------- backbone
    def embed_tokens(self, x: Tensor) -> Tensor:
        """Backbone tokens ``[B, L, token_dim]`` (long for ``index``) → ``[B, L, De]``."""
        kind = self.spec.kind
        if kind == "index":
            return self.tok_embeddings(x.long() + self.code_offsets).sum(2)
        if kind == "bits":
            x = x.to(self.z_proj.weight.dtype) * 2 - 1
        return self.z_proj(x.to(self.z_proj.weight.dtype))

    def _check_mask(self, mask: Tensor, b: int) -> tuple[Tensor, int]:
        if not isinstance(mask, Tensor) or mask.shape != (b, self.seq_len):
            raise ValueError(f"mask must be a tensor [{b}, {self.seq_len}], got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        mask = mask.bool()
        counts = mask.sum(1)
        if b and not bool((counts == counts[0]).all()):
            raise ValueError(f"every row must mask the same number of positions, got counts {counts.tolist()}")
        return mask, int(counts[0]) if b else 0

    @staticmethod
    def _key_mask(valid: Tensor | None) -> Tensor | None:
        return None if valid is None else valid[:, None, None, :]

    def encode(self, tokens: Tensor, mask: Tensor, buffer: Prefix) -> Tensor:
        """MAR's ``forward_mae_encoder``: ``tokens [B, L, token_dim]``, ``mask [B, L]`` (True = masked), ``buffer``
        ``[B, P, De]`` → ``[B, P + n_visible, De]`` (buffer first, then visible tokens by position)."""
        b = tokens.shape[0]
        mask, masked = self._check_mask(mask, b)
        if buffer.x.shape != (b, self.buffer_size, self.config.encoder_width):
            raise ValueError(f"buffer must have shape [{b}, {self.buffer_size}, {self.config.encoder_width}], got "
                             f"{tuple(buffer.x.shape)}")
        x = torch.cat([buffer.x.to(self.encoder_pos_embed_learned.dtype), self.embed_tokens(tokens)], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        keep = torch.cat([mask.new_ones(b, self.buffer_size), ~mask], dim=1)
        x = x[keep].view(b, self.buffer_size + self.seq_len - masked, -1)
        attn_mask = None
        if buffer.key_valid is not None:
            valid = torch.cat([buffer.key_valid, mask.new_ones(b, self.seq_len - masked)], dim=1)
            attn_mask = self._key_mask(valid)
        for block in self.encoder_blocks:
            x = block(x, attn_mask=attn_mask)
        return self.encoder_norm(x)

    def decode(self, x: Tensor, mask: Tensor, key_valid: Tensor | None = None) -> Tensor:
        """MAR's ``forward_mae_decoder``: encoder output ``[B, P + n_visible, De]`` → ``z: [B, L, Dd]``."""
        b = x.shape[0]
        mask, _ = self._check_mask(mask, b)
        x = self.decoder_embed(x)
        keep = torch.cat([mask.new_ones(b, self.buffer_size), ~mask], dim=1)
        full = self.mask_token.to(x.dtype).repeat(b, keep.shape[1], 1)
        full[keep] = x.reshape(-1, x.shape[-1])
        x = full + self.decoder_pos_embed_learned
        attn_mask = None
        if key_valid is not None:
            attn_mask = self._key_mask(torch.cat([key_valid, mask.new_ones(b, self.seq_len)], dim=1))
        for block in self.decoder_blocks:
            x = block(x, attn_mask=attn_mask)
        x = self.decoder_norm(x)
        return x[:, self.buffer_size:] + self.diffusion_pos_embed_learned

    def backbone(self, tokens: Tensor, mask: Tensor, buffer: Prefix) -> Tensor:
        """One encoder + decoder pass: ``z: [B, L, Dd]`` for every position (one "forward pass" of generation)."""
        return self.decode(self.encode(tokens, mask, buffer), mask, buffer.key_valid)

    # ---------------------------------------------------------------- training
    def random_mask(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        """``[B, L]`` bool training mask: ``ceil(L·ratio)`` positions of a random order per row, one truncated-normal
        ratio per batch."""
        ratio = sample_mask_ratio(self.config.mask_ratio_min, self.config.mask_ratio_std, generator)
        count = min(self.seq_len, max(1, math.ceil(self.seq_len * ratio)))
        return first_of_order(random_orders(generator, batch, self.seq_len, self.device), count)

    def forward(self, tokens: Tokens, cond: Condition | Tensor | None = None, return_logits: bool = False,
                mask: Tensor | None = None, generator: torch.Generator | None = None) -> dict:
        """Masked training pass → ``{"loss": scalar, "mask": [B, L] bool}``.

        Args:
            tokens: ``Tokens`` of this spec. cond: matching condition (dropped with ``cond_dropout`` in training).
            return_logits: accepted for the trainers' common call; ignored (a masked model has no per-token logits
                of the whole sequence).
            mask: a given ``[B, L]`` mask (True = masked) instead of MAR's random one.
            generator: seeds the random mask (order and ratio).
        """
        self.check_tokens(tokens)
        b = tokens.batch_size
        cond = self.as_condition(cond, b if self.condition_kind == "none" else None)
        if cond.batch_size != b:
            raise ValueError(f"cond has batch size {cond.batch_size} but tokens have {b}")
        x = self.to_patches(tokens)
        if mask is None:
            mask = self.random_mask(b, generator)
        else:
            mask, masked = self._check_mask(mask.to(self.device), b)
            if masked < 1:
                raise ValueError("mask must mask at least one position per row (the loss is over masked positions)")
        z = self.backbone(x, mask, self.buffer(cond))
        loss = self.output_head.loss(z[mask], x[mask])
        return {"loss": loss.mean(), "mask": mask}


__all__ = ["MaskedAR"]
