"""RVQ image tokenizer: conv autoencoder with a residual-quantised latent (``"rvq"``).

Images ``[B, 3, H, W]`` in ``[-1, 1]`` → a ``Grid(H/f, W/f)`` of ``depth`` indices per position (spec ``index``,
``depth = D_r``, ``vocab_size`` codes per codebook; ``Tokens.data[..., i]`` is level ``i``). Quantiser:
:mod:`tokenloom.tokenizers.quantizers.rvq` (shared or separate codebooks, EMA, restarts, quantiser dropout).

Prefix decoding: the spec has a fixed depth, so ``decode(tokens)`` uses every level and
``decode_levels(tokens, n)`` uses only the first ``n`` (the other levels of ``tokens`` are ignored and may hold
anything valid). Trained with ``quantizer_dropout > 0``, every prefix decodes to a coarser image.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffusers.configuration_utils import register_to_config
from torch import Tensor

from tokenloom.tokenizers import register
from tokenloom.tokenizers.conv_tokenizer import ConvTokenizer, eval_mode
from tokenloom.tokenizers.quantizers.rvq import ResidualVectorQuantizer
from tokenloom.tokens import Grid, Tokens, TokenSpec


@register("rvq")
class RVQTokenizer(ConvTokenizer):
    """Residual-VQ tokenizer (``spec``: ``index``, ``vocab_size = codebook_size``, ``depth``, ``Grid``).

    Args:
        image_size: square image side the ``spec`` describes.
        ch, ch_mult, num_res_blocks, z_channels, attn_levels, mid_attn, norm_groups: autoencoder sizes.
        depth: residual levels.
        codebook_size: codes per codebook.
        codebook_dim: code dimension (``quant_conv`` output channels).
        shared_codebook: one codebook for every level.
        beta: commitment weight.
        ema_decay: 0 = gradient-trained codebooks, else EMA updates with this decay.
        dead_code_threshold: 0 = off, else restart codes used less than this many times per batch (on average).
        quantizer_dropout: fraction of each training batch decoded from a random prefix of levels.
        codebook_weight: weight of the quantiser losses in the total loss.
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
        depth: int = 4,
        codebook_size: int = 256,
        codebook_dim: int = 16,
        shared_codebook: bool = False,
        beta: float = 0.25,
        ema_decay: float = 0.0,
        dead_code_threshold: float = 0.0,
        quantizer_dropout: float = 0.0,
        codebook_weight: float = 1.0,
        recon_loss: str = "l1",
    ):
        super().__init__()
        self._build(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    z_channels=z_channels, latent_dim=codebook_dim, attn_levels=attn_levels, mid_attn=mid_attn,
                    norm_groups=norm_groups, recon_loss=recon_loss)
        self.quantize = ResidualVectorQuantizer(depth, codebook_size, codebook_dim, shared_codebook=shared_codebook,
                                                beta=beta, ema_decay=ema_decay,
                                                dead_code_threshold=dead_code_threshold,
                                                quantizer_dropout=quantizer_dropout)
        self.codebook_weight = float(codebook_weight)

    @property
    def spec(self) -> TokenSpec:
        side = self.latent_side
        return TokenSpec(kind="index", vocab_size=self.quantize.num_codes, depth=self.quantize.depth,
                         layout=Grid(side, side))

    def quantize_latent(self, z: Tensor):
        q = self.quantize(z)
        loss = self.codebook_weight * (q.codebook_loss + q.commit_loss)
        logs = {"codebook_loss": q.codebook_loss, "commit_loss": q.commit_loss, "usage": q.usage.mean(),
                "usage_last_level": q.usage[-1], "perplexity": q.perplexity.mean()}
        return q.z_q, loss, logs

    def encode(self, images: Tensor) -> Tokens:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` → ``Tokens`` ``[B, L, depth]`` (row-major positions)."""
        self.check_images(images)
        with eval_mode(self.quantize):
            q = self.quantize(self.encode_latent(images))
        return Tokens(q.indices.reshape(images.shape[0], -1, self.quantize.depth), self.spec)

    def latent_from_tokens(self, tokens: Tokens, num_levels: int | None = None) -> Tensor:
        """``Tokens`` → quantised latent ``[B, codebook_dim, h, w]`` from the first ``num_levels`` levels."""
        self.check_tokens(tokens)
        depth = self.quantize.depth
        n = depth if num_levels is None else num_levels
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= depth:
            raise ValueError(f"num_levels must be an int in [1, {depth}], got {num_levels!r}")
        side = self.latent_side
        vectors = self.quantize.lookup(tokens.data[..., :n])  # [B, L, D]
        return vectors.reshape(vectors.shape[0], side, side, -1).permute(0, 3, 1, 2)

    def decode(self, tokens: Tokens) -> Tensor:
        """``Tokens`` of this spec → images ``[B, 3, H, W]`` from all levels (not clamped)."""
        return self.decode_latent(self.latent_from_tokens(tokens))

    def decode_levels(self, tokens: Tokens, num_levels: int) -> Tensor:
        """``Tokens`` of this spec → images ``[B, 3, H, W]`` from the first ``num_levels`` levels only."""
        return self.decode_latent(self.latent_from_tokens(tokens, num_levels))

    def embed(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → ``[B, L, codebook_dim]``: the sum of every level's code vector (the quantised latent)."""
        self.check_tokens(tokens)
        return self.quantize.lookup(tokens.data)

    def level_embeddings(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → ``[B, L, depth, codebook_dim]``: each level's code vector (for depth-wise generators)."""
        self.check_tokens(tokens)
        return self.quantize.level_vectors(tokens.data)


__all__ = ["RVQTokenizer"]
