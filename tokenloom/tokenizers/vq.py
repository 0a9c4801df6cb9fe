"""VQ image tokenizer in LlamaGen's VQModel layout: encoder → quant_conv → quantiser → post_quant_conv → decoder.

Images ``[B, 3, H, W]`` in ``[-1, 1]`` become a ``Grid(H/f, W/f)`` of codebook indices, ``f = 2**(n-1)`` for
``n = len(ch_mult)`` levels. ``quant_conv`` is a 1×1 conv from ``z_channels`` to the low ``codebook_dim``
(8 in LlamaGen), ``post_quant_conv`` a 1×1 conv back. Training: ``model(images)`` returns the reconstruction and
the loss ``recon + codebook + commit`` (no perceptual or GAN term: no LPIPS weights offline).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from tokenloom.tokenizers import register
from tokenloom.tokenizers.autoencoder import Decoder, Encoder
from tokenloom.tokenizers.base import ImageTokenizer
from tokenloom.tokenizers.quantizers.vq import VectorQuantizer
from tokenloom.tokens import Grid, Tokens, TokenSpec

RECON_LOSSES = ("l1", "mse")


@register("vq")
class VQTokenizer(ImageTokenizer):
    """LlamaGen-style VQ tokenizer (``spec``: ``index`` tokens, ``vocab_size = codebook_size``, ``Grid``).

    Args:
        image_size: square image side the ``spec`` describes; must be divisible by the downsampling factor.
        ch, ch_mult, num_res_blocks, z_channels, norm_groups, mid_attn: encoder/decoder sizes
            (see :mod:`tokenloom.tokenizers.autoencoder`).
        decoder_ch_mult: decoder multipliers when they differ from the encoder's (LlamaGen allows it);
            None = ``ch_mult``. Both must give the same downsampling factor.
        attn_levels, decoder_attn_levels: levels with attention (None = last level only).
        codebook_size: ``K`` codes.
        codebook_dim: code dimension ``D``.
        codebook_l2_norm: normalise latents and codes at use time (LlamaGen default).
        beta: commitment loss weight.
        ema_decay: 0 = gradient-trained codebook, else EMA updates with this decay.
        dead_code_threshold: 0 = off, else restart codes used less than this many times per batch (on average).
        recon_loss: ``"l1"`` or ``"mse"``.
        codebook_weight: weight of ``codebook_loss + commit_loss`` in the total loss.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2),
        decoder_ch_mult: Sequence[int] | None = None,
        num_res_blocks: int = 1,
        z_channels: int = 64,
        attn_levels: Sequence[int] | None = None,
        decoder_attn_levels: Sequence[int] | None = None,
        mid_attn: bool = True,
        norm_groups: int = 32,
        codebook_size: int = 512,
        codebook_dim: int = 8,
        codebook_l2_norm: bool = True,
        beta: float = 0.25,
        ema_decay: float = 0.0,
        dead_code_threshold: float = 0.0,
        recon_loss: str = "l1",
        codebook_weight: float = 1.0,
    ):
        super().__init__()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        decoder_ch_mult = ch_mult if decoder_ch_mult is None else decoder_ch_mult
        if len(decoder_ch_mult) != len(ch_mult):
            raise ValueError(f"decoder_ch_mult must have as many levels as ch_mult ({len(ch_mult)}) so that "
                             f"decoding undoes the downsampling, got {list(decoder_ch_mult)!r}")
        self.encoder = self.build_encoder(ch, ch_mult, num_res_blocks, z_channels, attn_levels, mid_attn,
                                          norm_groups)
        self.decoder = Decoder(3, ch, decoder_ch_mult, num_res_blocks, z_channels, attn_levels=decoder_attn_levels,
                               mid_attn=mid_attn, norm_groups=norm_groups)
        self.downsample_factor = self.encoder.downsample_factor
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1 \
                or image_size % self.downsample_factor:
            raise ValueError(f"image_size must be a positive int divisible by the downsampling factor "
                             f"{self.downsample_factor} (2 ** (len(ch_mult) - 1)), got {image_size!r}")
        self.image_size = image_size
        self.quant_conv = nn.Conv2d(z_channels, codebook_dim, 1)
        self.quantize = VectorQuantizer(codebook_size, codebook_dim, beta=beta, l2_norm=codebook_l2_norm,
                                        ema_decay=ema_decay, dead_code_threshold=dead_code_threshold)
        self.post_quant_conv = nn.Conv2d(codebook_dim, z_channels, 1)
        self.recon_loss_name = recon_loss
        self.codebook_weight = float(codebook_weight)

    @staticmethod
    def build_encoder(ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                      attn_levels: Sequence[int] | None, mid_attn: bool, norm_groups: int) -> nn.Module:
        """The encoder, ``[B, 3, H, W]`` → ``[B, z_channels, H/f, W/f]``: LlamaGen's conv encoder here."""
        return Encoder(3, ch, ch_mult, num_res_blocks, z_channels, attn_levels=attn_levels, mid_attn=mid_attn,
                       norm_groups=norm_groups)

    @property
    def spec(self) -> TokenSpec:
        side = self.image_size // self.downsample_factor
        return TokenSpec(kind="index", vocab_size=self.quantize.num_codes, layout=Grid(side, side))

    # ---- latents ----
    def encode_latent(self, images: Tensor) -> Tensor:
        """``images: [B, 3, H, W]`` → pre-quantisation latent ``[B, D, H/f, W/f]`` (no input checks)."""
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """Quantised latent ``[B, D, h, w]`` → images ``[B, 3, h*f, w*f]`` (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def indices_to_latent(self, indices: Tensor) -> Tensor:
        """``indices: [B, L]`` long (row-major over the spec's grid) → ``[B, D, h, w]`` codebook vectors."""
        grid = self.spec.layout
        vectors = self.quantize.lookup(indices)  # [B, L, D]
        return vectors.reshape(indices.shape[0], grid.h, grid.w, -1).permute(0, 3, 1, 2)

    # ---- the tokenizer contract ----
    def encode(self, images: Tensor) -> Tokens:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` → ``Tokens`` with data ``[B, L, 1]`` (row-major codes)."""
        self.check_images(images)
        out = self.quantize_images(images)
        return Tokens(out.indices.reshape(images.shape[0], -1, 1), self.spec)

    def quantize_images(self, images: Tensor):
        """Encoder + quantiser in eval fashion (no statistics updates): a :class:`QuantizerOutput`."""
        was_training = self.quantize.training
        self.quantize.eval()
        try:
            return self.quantize(self.encode_latent(images))
        finally:
            self.quantize.train(was_training)

    def decode(self, tokens: Tokens) -> Tensor:
        """``Tokens`` of this tokenizer's spec → images ``[B, 3, H, W]`` (roughly ``[-1, 1]``, not clamped)."""
        self.check_tokens(tokens)
        return self.decode_latent(self.indices_to_latent(tokens.data[..., 0]))

    def embed(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → ``[B, L, D]`` codebook vectors (L2-normalised when ``codebook_l2_norm``)."""
        self.check_tokens(tokens)
        return self.quantize.lookup(tokens.data[..., 0])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Training step: ``images: [B, 3, H, W]`` → dict with ``loss`` (total), ``recon`` ``[B, 3, H, W]``,
        ``recon_loss``, ``codebook_loss``, ``commit_loss``, ``indices`` ``[B, L]``, ``usage``, ``perplexity``."""
        self.check_images(images)
        q = self.quantize(self.encode_latent(images))
        recon = self.decode_latent(q.z_q)
        if self.recon_loss_name == "l1":
            recon_loss = F.l1_loss(recon, images)
        else:
            recon_loss = F.mse_loss(recon, images)
        loss = recon_loss + self.codebook_weight * (q.codebook_loss + q.commit_loss)
        return {
            "loss": loss,
            "recon": recon,
            "recon_loss": recon_loss.detach(),
            "codebook_loss": q.codebook_loss.detach(),
            "commit_loss": q.commit_loss.detach(),
            "indices": q.indices.reshape(images.shape[0], -1),
            "usage": q.usage,
            "perplexity": q.perplexity,
        }


__all__ = ["VQTokenizer"]
