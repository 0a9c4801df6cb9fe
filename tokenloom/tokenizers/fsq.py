"""FSQ image tokenizer: conv autoencoder with a finite-scalar-quantised latent (``"fsq"``).

Images ``[B, 3, H, W]`` in ``[-1, 1]`` → a ``Grid(H/f, W/f)`` of indices into the implicit codebook of
``prod(levels)`` codes (spec ``index``, depth 1). ``quant_conv`` maps the encoder's channels to ``len(levels)``
FSQ channels (:mod:`tokenloom.tokenizers.quantizers.fsq`). No codebook, no auxiliary loss: the training loss is
the reconstruction loss alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers.configuration_utils import register_to_config
from torch import Tensor

from tokenloom.tokenizers import register
from tokenloom.tokenizers.conv_tokenizer import ConvTokenizer
from tokenloom.tokenizers.quantizers.fsq import BOUND_EPS, FiniteScalarQuantizer
from tokenloom.tokens import Grid, Tokens, TokenSpec


@register("fsq")
class FSQTokenizer(ConvTokenizer):
    """FSQ tokenizer (``spec``: ``index``, ``vocab_size = prod(levels)``, ``Grid``).

    Args:
        image_size: square image side the ``spec`` describes.
        ch, ch_mult, num_res_blocks, z_channels, attn_levels, mid_attn, norm_groups: autoencoder sizes
            (:mod:`tokenloom.tokenizers.autoencoder`).
        levels: FSQ levels per latent channel (e.g. ``[8, 5, 5, 5]``).
        bound_eps: FSQ bound margin.
        recon_loss: ``"l1"`` or ``"mse"``.
    """

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
        levels: Sequence[int] = (8, 5, 5, 5),
        bound_eps: float = BOUND_EPS,
        recon_loss: str = "l1",
    ):
        super().__init__()
        self.quantize = FiniteScalarQuantizer(list(levels), eps=bound_eps)
        self._build(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    z_channels=z_channels, latent_dim=self.quantize.dim, attn_levels=attn_levels, mid_attn=mid_attn,
                    norm_groups=norm_groups, recon_loss=recon_loss)

    @property
    def spec(self) -> TokenSpec:
        side = self.latent_side
        return TokenSpec(kind="index", vocab_size=self.quantize.codebook_size, layout=Grid(side, side))

    def quantize_latent(self, z: Tensor):
        out = self.quantize(z)
        return out.z_q, z.new_zeros(()), {"usage": out.usage, "perplexity": out.perplexity}

    def encode(self, images: Tensor) -> Tokens:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` → ``Tokens`` ``[B, L, 1]`` (row-major indices)."""
        self.check_images(images)
        out = self.quantize(self.encode_latent(images))
        return Tokens(out.indices.reshape(images.shape[0], -1, 1), self.spec)

    def indices_to_latent(self, indices: Tensor) -> Tensor:
        """``indices: [B, L]`` (row-major) → FSQ codes ``[B, len(levels), h, w]``."""
        side = self.latent_side
        return self.quantize.indices_to_codes(indices).reshape(indices.shape[0], side, side, -1).permute(0, 3, 1, 2)

    def decode(self, tokens: Tokens) -> Tensor:
        """``Tokens`` of this spec → images ``[B, 3, H, W]`` (not clamped)."""
        self.check_tokens(tokens)
        return self.decode_latent(self.indices_to_latent(tokens.data[..., 0]))

    def embed(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → ``[B, L, len(levels)]`` FSQ code vectors in ``[-1, 1]``."""
        self.check_tokens(tokens)
        return self.quantize.indices_to_codes(tokens.data[..., 0])


__all__ = ["FSQTokenizer"]
