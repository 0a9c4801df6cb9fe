"""Plumbing shared by the quantised conv-autoencoder tokenizers (RVQ, multi-scale VQ, LFQ/BSQ, FSQ).

``images [B, 3, H, W] → encoder → quant_conv → (quantiser) → post_quant_conv → decoder → [B, 3, H, W]``, with the
taming/LDM :class:`~tokenloom.tokenizers.autoencoder.Encoder`/``Decoder``. ``quant_conv`` maps the encoder's
``z_channels`` to the quantiser's ``latent_dim`` and ``post_quant_conv`` maps back (kernel 1, or 3 as VAR).

A subclass calls :meth:`ConvTokenizer._build` in its ``__init__`` and implements ``quantize_latent(z) ->
(z_q, quant_loss, logs)`` (training step) plus the contract methods; :meth:`ConvTokenizer.forward` is the one
training step every subclass shares (``loss = recon_loss + quant_loss``), so ``tokenizer_trainer`` trains them all.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from tokenloom.tokenizers.autoencoder import Decoder, Encoder
from tokenloom.tokenizers.base import ImageTokenizer

RECON_LOSSES = ("l1", "mse")


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run ``module`` in eval mode (no statistics updates, no dropout), restoring its mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class ConvTokenizer(ImageTokenizer):
    """Base of conv-autoencoder tokenizers; see module docstring."""

    def _build(self, *, image_size: int, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
               latent_dim: int, attn_levels: Sequence[int] | None, mid_attn: bool, norm_groups: int,
               fused_qkv: bool = False, quant_conv_kernel: int = 1, recon_loss: str = "l1") -> None:
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        if quant_conv_kernel not in (1, 3):
            raise ValueError(f"quant_conv_kernel must be 1 or 3, got {quant_conv_kernel!r}")
        self.encoder = Encoder(3, ch, ch_mult, num_res_blocks, z_channels, attn_levels=attn_levels,
                               mid_attn=mid_attn, fused_qkv=fused_qkv, norm_groups=norm_groups)
        self.decoder = Decoder(3, ch, ch_mult, num_res_blocks, z_channels, attn_levels=attn_levels,
                               mid_attn=mid_attn, fused_qkv=fused_qkv, norm_groups=norm_groups)
        self.downsample_factor = self.encoder.downsample_factor
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1 \
                or image_size % self.downsample_factor:
            raise ValueError(f"image_size must be a positive int divisible by the downsampling factor "
                             f"{self.downsample_factor} (2 ** (len(ch_mult) - 1)), got {image_size!r}")
        self.image_size = image_size
        pad = quant_conv_kernel // 2
        self.quant_conv = nn.Conv2d(z_channels, latent_dim, quant_conv_kernel, padding=pad)
        self.post_quant_conv = nn.Conv2d(latent_dim, z_channels, quant_conv_kernel, padding=pad)
        self.recon_loss_name = recon_loss

    @property
    def latent_side(self) -> int:
        """Side of the square latent grid, ``image_size / downsample_factor``."""
        return self.image_size // self.downsample_factor

    @property
    def latent_dim(self) -> int:
        """Channels ``D`` of the quantiser's latent (and of multi-scale next-scale inputs)."""
        return self.quant_conv.out_channels

    def encode_latent(self, images: Tensor) -> Tensor:
        """``images: [B, 3, H, W]`` → pre-quantisation latent ``[B, latent_dim, H/f, W/f]`` (no input checks)."""
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, z_q: Tensor) -> Tensor:
        """Quantised latent ``[B, latent_dim, h, w]`` → images ``[B, 3, h·f, w·f]`` (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def quantize_latent(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Training-time quantisation: ``z`` → ``(z_q straight-through, quantiser loss, scalar logs)``."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Training step: ``images: [B, 3, H, W]`` → dict with ``loss`` (total), ``recon`` ``[B, 3, H, W]``,
        ``recon_loss``, ``quant_loss`` and the quantiser's scalar logs."""
        self.check_images(images)
        z_q, quant_loss, logs = self.quantize_latent(self.encode_latent(images))
        recon = self.decode_latent(z_q)
        recon_loss = F.l1_loss(recon, images) if self.recon_loss_name == "l1" else F.mse_loss(recon, images)
        out = {"loss": recon_loss + quant_loss, "recon": recon, "recon_loss": recon_loss.detach(),
               "quant_loss": quant_loss.detach()}
        out.update({k: v.detach() for k, v in logs.items()})
        return out


__all__ = ["ConvTokenizer", "RECON_LOSSES", "eval_mode"]
