"""Adapter for :class:`diffusers.VQModel`: VQ-GANs in diffusers' format (aMUSEd, MoVQ/Kandinsky-style) as tokenizers.

``spec = TokenSpec(kind="index", vocab_size=num_vq_embeddings, layout=Grid(H/f, W/f))`` with
``f = 2 ** (len(block_out_channels) - 1)``. The module tree is the VQModel itself (``self.vqmodel``), so
:meth:`VQModelTokenizer.from_diffusers` loads any diffusers VQModel folder and :meth:`to_diffusers` hands it back.

* ``encode``: ``vqmodel.encode(x).latents`` (encoder + ``quant_conv``) → nearest codebook row per position with
  :func:`tokenloom.kernels.nearest_code.nearest_code` (exact, lowest index on ties, no ``[N, K]`` distance
  matrix; diffusers' quantiser uses ``cdist`` + ``argmin``, which agrees except on float near-ties).
* ``decode``: codebook rows → ``vqmodel.decode(..., force_not_quantize=True)`` (``post_quant_conv`` + decoder;
  MoVQ's spatially-normalised decoder gets the quantised latent too). For ``lookup_from_codebook`` models
  (aMUSEd) the indices go in directly, as in diffusers' aMUSEd pipeline.
* ``embed``: the codebook rows ``[B, L, vq_embed_dim]``.
* ``forward`` (training): reconstruction (L1 or MSE) plus diffusers' quantiser loss (codebook + commitment).
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import VQModel
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from tokenloom.kernels.nearest_code import nearest_code
from tokenloom.tokenizers import register
from tokenloom.tokenizers.base import ImageTokenizer
from tokenloom.tokens import Grid, Tokens, TokenSpec

RECON_LOSSES = ("l1", "mse")

# A small trainable default: 32x32 -> Grid(8, 8), 256 codes of dim 4.
DEFAULT_VQMODEL = {
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "latent_channels": 4, "num_vq_embeddings": 256,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "norm_num_groups": 32, "sample_size": 32,
}


def _diffusers_config(model: VQModel) -> dict:
    """The JSON-serialisable constructor arguments of a VQModel (its config without private keys)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}


@register("vqmodel")
class VQModelTokenizer(ImageTokenizer):
    """A ``diffusers.VQModel`` behind the tokenizer contract (``spec``: ``index``, ``vocab = num_vq_embeddings``).

    Args:
        image_size: square image side the ``spec`` describes; divisible by the downsampling factor.
        vqmodel_config: ``VQModel`` constructor arguments; None = :data:`DEFAULT_VQMODEL`.
        recon_loss: ``"l1"`` or ``"mse"`` (training only).
    """

    @register_to_config
    def __init__(self, image_size: int = 32, vqmodel_config: dict | None = None, recon_loss: str = "l1"):
        super().__init__()
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        if vqmodel_config is not None and not isinstance(vqmodel_config, dict):
            raise TypeError(f"vqmodel_config must be a dict of VQModel arguments or None, got "
                            f"{type(vqmodel_config).__name__}")
        self.vqmodel = VQModel(**(DEFAULT_VQMODEL if vqmodel_config is None else vqmodel_config))
        self.downsample_factor = 2 ** (len(self.vqmodel.config.block_out_channels) - 1)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1 \
                or image_size % self.downsample_factor:
            raise ValueError(f"image_size must be a positive int divisible by the downsampling factor "
                             f"{self.downsample_factor}, got {image_size!r}")
        self.image_size = image_size
        self.recon_loss_name = recon_loss

    @classmethod
    def from_diffusers(cls, path_or_model: str | VQModel, image_size: int | None = None,
                       subfolder: str | None = None, **kwargs) -> VQModelTokenizer:
        """A tokenizer around a diffusers ``VQModel`` (a local folder, or the model itself).

        ``image_size`` defaults to the config's ``sample_size``; pass ``subfolder="vqvae"`` (aMUSEd) or
        ``"movq"`` (Kandinsky) for a whole pipeline folder. ``kwargs`` go to the constructor.
        """
        if isinstance(path_or_model, VQModel):
            model = path_or_model
        elif isinstance(path_or_model, str):
            model = VQModel.from_pretrained(path_or_model, subfolder=subfolder)
        else:
            raise TypeError(f"path_or_model must be a folder path or a diffusers.VQModel, got "
                            f"{type(path_or_model).__name__}")
        if image_size is None:
            size = model.config.sample_size
            image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        tok = cls(image_size=image_size, vqmodel_config=_diffusers_config(model), **kwargs)
        tok.vqmodel.load_state_dict(model.state_dict(), strict=True)
        tok = tok.to(model.device)
        return tok if model.dtype == tok.dtype else tok.to(model.dtype)

    def to_diffusers(self) -> VQModel:
        """The wrapped ``diffusers.VQModel`` (shares the weights)."""
        return self.vqmodel

    @property
    def codebook(self) -> Tensor:
        """``[K, D]`` codebook rows."""
        return self.vqmodel.quantize.embedding.weight

    @property
    def spec(self) -> TokenSpec:
        side = self.image_size // self.downsample_factor
        return TokenSpec(kind="index", vocab_size=int(self.vqmodel.config.num_vq_embeddings), layout=Grid(side, side))

    def encode(self, images: Tensor) -> Tokens:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` → ``Tokens`` ``[B, L, 1]`` long (row-major code indices)."""
        self.check_images(images)
        h = self.vqmodel.encode(images).latents  # [B, D, h, w]
        z = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        indices = nearest_code(z.detach(), self.codebook.detach().to(z.dtype))
        return Tokens(indices.reshape(images.shape[0], -1, 1), self.spec)

    def decode(self, tokens: Tokens) -> Tensor:
        """``Tokens`` of this spec → images ``[B, 3, H, W]`` (roughly ``[-1, 1]``, not clamped)."""
        self.check_tokens(tokens)
        grid = self.spec.layout
        indices = tokens.data[..., 0]  # [B, L]
        shape = (indices.shape[0], grid.h, grid.w, self.codebook.shape[1])
        if self.vqmodel.config.lookup_from_codebook:
            return self.vqmodel.decode(indices.reshape(-1), force_not_quantize=True, shape=shape).sample
        quant = self.vqmodel.quantize.get_codebook_entry(indices.reshape(-1), shape)  # [B, D, h, w]
        return self.vqmodel.decode(quant, force_not_quantize=True).sample

    def embed(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → ``[B, L, D]`` codebook rows."""
        self.check_tokens(tokens)
        return F.embedding(tokens.data[..., 0], self.codebook)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Training step: ``images: [B, 3, H, W]`` → dict with ``loss``, ``recon`` ``[B, 3, H, W]``,
        ``recon_loss`` and ``quantizer_loss`` (diffusers' codebook + commitment loss)."""
        self.check_images(images)
        out = self.vqmodel(images)
        recon = out.sample
        recon_loss = F.l1_loss(recon, images) if self.recon_loss_name == "l1" else F.mse_loss(recon, images)
        quantizer_loss = out.commit_loss.mean()
        return {"loss": recon_loss + quantizer_loss, "recon": recon, "recon_loss": recon_loss.detach(),
                "quantizer_loss": quantizer_loss.detach()}


__all__ = ["DEFAULT_VQMODEL", "VQModelTokenizer"]
