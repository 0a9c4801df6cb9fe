"""Bitwise image tokenizers: LFQ (``"lfq"``, MAGVIT-v2 / Open-MAGVIT2) and BSQ (``"bsq"``, Infinity's quantiser).

Images ``[B, 3, H, W]`` in ``[-1, 1]`` → a ``Grid(H/f, W/f)`` of ``bits`` bits per position (spec ``bits``).
``quant_conv`` maps the encoder's channels to ``bits`` channels; bit ``i`` is ``channel_i > 0`` (for BSQ, of the
L2-normalised latent). Training adds the entropy penalty and commitment loss of
:mod:`tokenloom.tokenizers.quantizers.lfq`. ``embed`` gives each position's code vector (``±s`` per bit).
The multi-scale bitwise form (Infinity) is ``"msbsq"`` in :mod:`tokenloom.tokenizers.multiscale`.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers.configuration_utils import register_to_config
from torch import Tensor

from tokenloom.tokenizers import register
from tokenloom.tokenizers.conv_tokenizer import ConvTokenizer, eval_mode
from tokenloom.tokenizers.quantizers.bsq import BinarySphericalQuantizer
from tokenloom.tokenizers.quantizers.lfq import LookupFreeQuantizer
from tokenloom.tokens import Grid, Tokens, TokenSpec


class BitwiseTokenizer(ConvTokenizer):
    """Shared contract of :class:`LFQTokenizer` and :class:`BSQTokenizer` (``self.quantize`` is the quantiser)."""

    quantize: LookupFreeQuantizer

    @property
    def spec(self) -> TokenSpec:
        side = self.latent_side
        return TokenSpec(kind="bits", bits=self.quantize.bits, layout=Grid(side, side))

    def quantize_latent(self, z: Tensor):
        out = self.quantize(z)
        logs = {"per_sample_entropy": out.per_sample_entropy, "codebook_entropy": out.codebook_entropy,
                "commit_loss": out.commit_loss, "bit_balance": out.bit_balance}
        return out.z_q, out.loss, logs

    def encode(self, images: Tensor) -> Tokens:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` → ``Tokens`` ``[B, L, bits]`` of 0/1 (row-major positions)."""
        self.check_images(images)
        with eval_mode(self.quantize):
            bits = self.quantize(self.encode_latent(images)).bits
        return Tokens(bits.reshape(images.shape[0], -1, self.quantize.bits), self.spec)

    def bits_to_latent(self, bits: Tensor) -> Tensor:
        """``bits: [B, L, bits]`` (row-major) → code vectors ``[B, bits, h, w]``."""
        side = self.latent_side
        return self.quantize.codes_to_latent(bits, side, side)

    def decode(self, tokens: Tokens) -> Tensor:
        """``Tokens`` of this spec → images ``[B, 3, H, W]`` (not clamped)."""
        self.check_tokens(tokens)
        return self.decode_latent(self.bits_to_latent(tokens.data))

    def embed(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → ``[B, L, bits]`` code vectors (``±code_scale``)."""
        self.check_tokens(tokens)
        return self.quantize.bits_to_codes(tokens.data)


_ARGS_DOC = """
    Args:
        image_size: square image side the ``spec`` describes.
        ch, ch_mult, num_res_blocks, z_channels, attn_levels, mid_attn, norm_groups: autoencoder sizes.
        bits: bits per position (latent channels).
        entropy_weight, diversity_gamma, commit_weight, inv_temperature, codebook_entropy: the quantiser's
            loss settings (:class:`~tokenloom.tokenizers.quantizers.lfq.LookupFreeQuantizer`).
        recon_loss: ``"l1"`` or ``"mse"``.
"""


@register("lfq")
class LFQTokenizer(BitwiseTokenizer):
    __doc__ = "Lookup-free quantisation tokenizer (``spec``: ``bits``, ``Grid``); codes ``±code_scale``.\n" + _ARGS_DOC

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 64,
        attn_levels: Sequence[int] | None = None,
        mid_attn: bool = True,
        norm_groups: int = 32,
        bits: int = 12,
        code_scale: float = 1.0,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commit_weight: float = 0.25,
        inv_temperature: float = 100.0,
        codebook_entropy: str = "exact",
        recon_loss: str = "l1",
    ):
        super().__init__()
        self.quantize = LookupFreeQuantizer(bits, code_scale=code_scale, entropy_weight=entropy_weight,
                                            diversity_gamma=diversity_gamma, commit_weight=commit_weight,
                                            inv_temperature=inv_temperature, codebook_entropy=codebook_entropy)
        self._build(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    z_channels=z_channels, latent_dim=bits, attn_levels=attn_levels, mid_attn=mid_attn,
                    norm_groups=norm_groups, recon_loss=recon_loss)


@register("bsq")
class BSQTokenizer(BitwiseTokenizer):
    __doc__ = "Binary spherical quantisation tokenizer (``spec``: ``bits``, ``Grid``); codes ``±1/sqrt(bits)``.\n" \
        + _ARGS_DOC

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 64,
        attn_levels: Sequence[int] | None = None,
        mid_attn: bool = True,
        norm_groups: int = 32,
        bits: int = 12,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commit_weight: float = 0.25,
        inv_temperature: float = 100.0,
        codebook_entropy: str = "factorized",
        recon_loss: str = "l1",
    ):
        super().__init__()
        self.quantize = BinarySphericalQuantizer(bits, entropy_weight=entropy_weight,
                                                 diversity_gamma=diversity_gamma, commit_weight=commit_weight,
                                                 inv_temperature=inv_temperature, codebook_entropy=codebook_entropy)
        self._build(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    z_channels=z_channels, latent_dim=bits, attn_levels=attn_levels, mid_attn=mid_attn,
                    norm_groups=norm_groups, recon_loss=recon_loss)


__all__ = ["BSQTokenizer", "BitwiseTokenizer", "LFQTokenizer"]
