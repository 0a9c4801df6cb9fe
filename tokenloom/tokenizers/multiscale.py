"""Multi-scale residual tokenizers: VAR's VQVAE (``"msvq"``) and Infinity-style bitwise scales (``"msbsq"``).

Images ``[B, 3, H, W]`` in ``[-1, 1]`` → tokens over a coarse-to-fine ``Scales`` layout, scale after scale, each
scale row-major (:mod:`tokenloom.tokenizers.quantizers.multiscale` has the algorithm):

* ``"msvq"``: one codebook over every scale (spec ``index``, depth 1), bicubic upsampling and VAR's shared φ
  refinement convs. With ``fused_qkv=True``, ``quant_conv_kernel=3`` and ``codebook_dim = z_channels`` the module
  tree is VAR's ``VQVAE`` (see ``tokenloom.interop.var_vqvae``).
* ``"msbsq"``: binary spherical quantisation at every scale (spec ``bits``), bilinear upsampling, no φ by default
  (Infinity's ``MultiScaleBSQ`` for images).

API for next-scale generators (the ``ScaleCodec`` protocol of ``tokenloom.generators.next_scale``; ``codes`` are
token data ``[B, n, C]``: ``C = 1`` for ``msvq``, ``bits`` for ``msbsq``; ``D`` = latent channels):

* ``embed(tokens) -> [B, L, D]``: each token's code vector;
* ``teacher_inputs(tokens) -> [B, L − h_0·w_0, D]``: teacher-forcing inputs (VAR's ``idxBl_to_var_input``):
  the running sum ``f_hat`` after scales ``0..k``, area-downsampled to scale ``k+1``, for ``k = 0 .. K−2``;
* ``next_input(f_hat, scale_index, codes) -> (f_hat, next)``: one sampling step (VAR's
  ``get_next_autoregressive_input``); ``f_hat`` ``[B, D, h, w]`` or None at the start; ``next`` is
  ``[B, h_{k+1}·w_{k+1}, D]``, None after the last scale;
* ``quantize_scale(f_rest, scale_index) -> codes``: the codes scale ``k`` gives a residual latent ``f_rest``
  ``[B, D, h, w]`` (for Infinity's bitwise self-correction); ``encode_latent(images)`` gives the latent ``f``;
* ``decode_f_hat(f_hat) -> images``: decode the final ``f_hat``; equals ``decode(tokens)`` of the same codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from tokenloom.tokenizers import register
from tokenloom.tokenizers.conv_tokenizer import ConvTokenizer, eval_mode
from tokenloom.tokenizers.quantizers.bsq import BinarySphericalQuantizer
from tokenloom.tokenizers.quantizers.multiscale import MultiScaleResidualQuantizer, VQScaleQuantizer, check_scales
from tokenloom.tokenizers.quantizers.vq import code_histogram_stats
from tokenloom.tokens import Grid, Scales, Tokens, TokenSpec


class MultiScaleTokenizer(ConvTokenizer):
    """Shared contract of the multi-scale tokenizers; ``self.quantize`` is a :class:`MultiScaleResidualQuantizer`."""

    quantize: MultiScaleResidualQuantizer

    def _build_quantizer(self, per_scale, scales, **kwargs) -> None:
        pairs = check_scales(scales)
        side = self.latent_side
        if pairs[-1] != (side, side):
            raise ValueError(f"the last of scales must be the latent size {side} (image_size {self.image_size} / "
                             f"downsampling {self.downsample_factor}), got {list(scales)!r}")
        self.quantize = MultiScaleResidualQuantizer(per_scale, pairs, **kwargs)

    def _spec_of(self, layout) -> TokenSpec:
        raise NotImplementedError

    @property
    def spec(self) -> TokenSpec:
        return self._spec_of(Scales(tuple(self.quantize.scales)))

    def quantize_latent(self, z: Tensor):
        out = self.quantize(z)
        return out.f_hat, out.loss, dict(out.logs)

    # ---- the tokenizer contract ----
    def encode(self, images: Tensor) -> Tokens:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` → ``Tokens`` ``[B, L, C]``, scale after scale."""
        self.check_images(images)
        with eval_mode(self.quantize):
            out = self.quantize(self.encode_latent(images))
        return Tokens(out.codes, self.spec)

    def decode(self, tokens: Tokens) -> Tensor:
        """``Tokens`` of this spec → images ``[B, 3, H, W]`` (not clamped; VAR clamps to ``[-1, 1]`` afterwards)."""
        self.check_tokens(tokens)
        return self.decode_latent(self.quantize.codes_to_f_hat(tokens.data))

    def embed(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → ``[B, L, D]`` each token's code vector."""
        self.check_tokens(tokens)
        return self.quantize.code_vectors(tokens.data)

    # ---- next-scale generation ----
    def teacher_inputs(self, tokens: Tokens) -> Tensor:
        """Teacher forcing: ``Tokens`` → ``[B, L − h_0·w_0, D]`` (see module docstring)."""
        self.check_tokens(tokens)
        return self.quantize.teacher_inputs(tokens.data)

    def next_input(self, f_hat: Tensor | None, scale_index: int, codes: Tensor) -> tuple[Tensor, Tensor | None]:
        """One sampling step: ``codes: [B, h_k·w_k, C]`` of scale ``scale_index`` → ``(f_hat, next input or None)``."""
        self.quantize.check_scale_index(scale_index)
        h, w = self.quantize.scales[scale_index]
        self._spec_of(Grid(h, w)).validate(codes, f"codes of scale {scale_index}")
        return self.quantize.next_input(f_hat, scale_index, codes.long())

    def quantize_scale(self, f_rest: Tensor, scale_index: int) -> Tensor:
        """Codes ``[B, h_k·w_k, C]`` of scale ``scale_index`` for a residual latent ``f_rest: [B, D, h, w]``."""
        with eval_mode(self.quantize):
            return self.quantize.quantize_residual(f_rest, scale_index)

    def decode_f_hat(self, f_hat: Tensor) -> Tensor:
        """The final ``f_hat: [B, D, h, w]`` of :meth:`next_input` → images ``[B, 3, H, W]``."""
        self.quantize.check_latent(f_hat, "f_hat")
        return self.decode_latent(f_hat)


@register("msvq")
class MultiScaleVQTokenizer(MultiScaleTokenizer):
    """VAR's multi-scale residual VQ (``spec``: ``index``, ``vocab_size = codebook_size``, ``Scales``).

    Args:
        image_size: square image side; ``image_size / f`` must be the last scale.
        ch, ch_mult, num_res_blocks, z_channels, attn_levels, mid_attn, norm_groups: autoencoder sizes.
        fused_qkv: one ``qkv`` conv in attention blocks (VAR's layout).
        quant_conv_kernel: 1, or 3 as VAR.
        codebook_size: codes ``V``.
        codebook_dim: code dimension (VAR: equal to ``z_channels``).
        scales: side of each scale, coarse to fine (ints or ``[h, w]``); the last is the latent side.
        num_phi, phi_ratio, phi_index, upsample_mode, beta: see :class:`MultiScaleResidualQuantizer`.
        codebook_l2_norm: cosine nearest codes over normalised rows (VAR: False, raw rows).
        ema_decay, dead_code_threshold: codebook EMA updates / dead-code restarts (0 = off).
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
        fused_qkv: bool = True,
        quant_conv_kernel: int = 3,
        codebook_size: int = 512,
        codebook_dim: int = 16,
        scales: Sequence = (1, 2, 3, 4, 6, 8),
        num_phi: int = 4,
        phi_ratio: float = 0.5,
        phi_index: Sequence[int] | None = None,
        upsample_mode: str = "bicubic",
        beta: float = 0.25,
        codebook_l2_norm: bool = False,
        ema_decay: float = 0.0,
        dead_code_threshold: float = 0.0,
        recon_loss: str = "l1",
    ):
        super().__init__()
        self._build(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    z_channels=z_channels, latent_dim=codebook_dim, attn_levels=attn_levels, mid_attn=mid_attn,
                    norm_groups=norm_groups, fused_qkv=fused_qkv, quant_conv_kernel=quant_conv_kernel,
                    recon_loss=recon_loss)
        per_scale = VQScaleQuantizer(codebook_size, codebook_dim, l2_norm=codebook_l2_norm, ema_decay=ema_decay,
                                     dead_code_threshold=dead_code_threshold)
        self._build_quantizer(per_scale, scales, num_phi=num_phi, phi_ratio=phi_ratio, phi_index=phi_index,
                              upsample_mode=upsample_mode, beta=beta)

    def _spec_of(self, layout) -> TokenSpec:
        return TokenSpec(kind="index", vocab_size=self.quantize.quantizer.num_codes, layout=layout)

    def quantize_latent(self, z: Tensor):
        out = self.quantize(z)
        counts = torch.bincount(out.codes.flatten(), minlength=self.quantize.quantizer.num_codes)
        usage, perplexity = code_histogram_stats(counts)
        return out.f_hat, out.loss, {**out.logs, "usage": usage, "perplexity": perplexity}


@register("msbsq")
class MultiScaleBSQTokenizer(MultiScaleTokenizer):
    """Infinity-style multi-scale bitwise tokenizer (``spec``: ``bits``, ``Scales``).

    Args:
        image_size, ch, ch_mult, num_res_blocks, z_channels, attn_levels, mid_attn, norm_groups, fused_qkv,
            quant_conv_kernel: as :class:`MultiScaleVQTokenizer`.
        bits: bits per position (latent channels).
        scales: side of each scale, coarse to fine; the last is the latent side.
        num_phi, phi_ratio, phi_index, upsample_mode, beta: see :class:`MultiScaleResidualQuantizer`
            (Infinity: no φ, bilinear).
        entropy_weight, diversity_gamma, commit_weight, inv_temperature, codebook_entropy: the BSQ loss settings
            at each scale (:class:`~tokenloom.tokenizers.quantizers.bsq.BinarySphericalQuantizer`).
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
        fused_qkv: bool = False,
        quant_conv_kernel: int = 1,
        bits: int = 12,
        scales: Sequence = (1, 2, 3, 4, 6, 8),
        num_phi: int = 0,
        phi_ratio: float = 0.5,
        phi_index: Sequence[int] | None = None,
        upsample_mode: str = "bilinear",
        beta: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        commit_weight: float = 0.25,
        inv_temperature: float = 100.0,
        codebook_entropy: str = "factorized",
        recon_loss: str = "l1",
    ):
        super().__init__()
        self._build(image_size=image_size, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                    z_channels=z_channels, latent_dim=bits, attn_levels=attn_levels, mid_attn=mid_attn,
                    norm_groups=norm_groups, fused_qkv=fused_qkv, quant_conv_kernel=quant_conv_kernel,
                    recon_loss=recon_loss)
        per_scale = BinarySphericalQuantizer(bits, entropy_weight=entropy_weight, diversity_gamma=diversity_gamma,
                                             commit_weight=commit_weight, inv_temperature=inv_temperature,
                                             codebook_entropy=codebook_entropy)
        self._build_quantizer(per_scale, scales, num_phi=num_phi, phi_ratio=phi_ratio, phi_index=phi_index,
                              upsample_mode=upsample_mode, beta=beta)

    def _spec_of(self, layout) -> TokenSpec:
        return TokenSpec(kind="bits", bits=self.quantize.quantizer.bits, layout=layout)


__all__ = ["MultiScaleBSQTokenizer", "MultiScaleTokenizer", "MultiScaleVQTokenizer"]
