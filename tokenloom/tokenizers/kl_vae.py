"""Continuous KL-VAE tokenizer: images ↔ scaled Gaussian-posterior latents (Stable Diffusion's VAE, MAR's KL-16).

Tokens are ``continuous`` vectors, one per latent pixel: ``spec = TokenSpec(kind="continuous", dim=C,
layout=Grid(H/f, W/f))`` with ``C`` latent channels and ``f`` the downsampling factor. The latent scaling lives
inside the tokenizer, so generators see roughly unit-variance tokens::

    encode:  z = posterior mean (or a sample)        [B, C, h, w]
             tokens = (z - shift_factor) * scaling_factor, flattened row-major to [B, h*w, C]
    decode:  z = tokens / scaling_factor + shift_factor → decoder

``scaling_factor`` and ``shift_factor`` are floats or per-channel lists (``latents_mean``/``latents_std`` VAEs).

Two module trees (``architecture``), one tokenizer:

* ``"diffusers"``: a :class:`diffusers.AutoencoderKL` built from ``autoencoder_config`` (its config dict), so any
  Stable-Diffusion-family VAE in diffusers' format loads through :meth:`KLVAETokenizer.from_diffusers`, and
  :meth:`KLVAETokenizer.to_diffusers` hands it back.
* ``"ldm"``: :class:`LDMAutoencoderKL`, tokenloom's taming/LDM encoder and decoder
  (:mod:`tokenloom.tokenizers.autoencoder`) with ``quant_conv``/``post_quant_conv``. Its state-dict keys are
  those of MAR's ``AutoencoderKL`` (``encoder.down.{i}.block.{k}...``, ``quant_conv``, ``post_quant_conv``,
  ``decoder.up.{i}...``) under the prefix ``autoencoder.``, and encoder attention can sit at any level, which
  diffusers' ``AutoencoderKL`` cannot express with MAR's key names. This is the route for MAR's KL-16 VAE
  (``scaling_factor=0.2325``, ``shift_factor=0``); it is also the small trainable config (``configs/tokenizer/
  kl_vae_shapes.yaml``).

Posterior (both trees): ``moments = quant_conv(encoder(x))`` split into mean and log-variance, the log-variance
clamped to ``[-30, 20]``. Training loss (``forward``): ``recon + kl_weight · KL``, where ``recon`` is the mean
per-pixel L1 or MSE and ``KL`` is the KL divergence to ``N(0, I)`` summed over latent elements and divided by the
number of image elements (``3·H·W``), i.e. LDM's sum-over-elements ratio with everything divided by ``3·H·W``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from tokenloom.tokenizers import register
from tokenloom.tokenizers.autoencoder import Decoder, Encoder
from tokenloom.tokenizers.base import ImageTokenizer
from tokenloom.tokens import Grid, Tokens, TokenSpec

ARCHITECTURES = ("ldm", "diffusers")
RECON_LOSSES = ("l1", "mse")
LOGVAR_RANGE = (-30.0, 20.0)

# The small trainable configs (4x downsampling, 8-channel latent: Grid(8, 8) at 32x32); "ldm" is the shapes recipe's.
DEFAULT_AUTOENCODERS = {
    "ldm": {"ch": 16, "ch_mult": [1, 2, 4], "num_res_blocks": 1, "latent_channels": 8, "attn_levels": [],
            "decoder_attn_levels": [], "mid_attn": True, "norm_groups": 8},
    "diffusers": {"block_out_channels": [16, 32, 64], "layers_per_block": 1, "latent_channels": 8,
                  "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
                  "norm_num_groups": 8, "sample_size": 32},
}


class LDMAutoencoderKL(nn.Module):
    """The LDM/MAR KL autoencoder: ``images [B, 3, H, W]`` → ``moments [B, 2C, H/f, W/f]``; ``z [B, C, h, w]`` →
    ``images``.

    Activations run in ``channels_last`` memory format (measured 2x faster training on CPU for narrow convs,
    oneDNN's preferred layout); values are unaffected.

    Args:
        ch, ch_mult, num_res_blocks, attn_levels, mid_attn, norm_groups: encoder/decoder sizes
            (:class:`~tokenloom.tokenizers.autoencoder.Encoder`); MAR: ch 128, ch_mult (1, 1, 2, 2, 4), 2 blocks,
            encoder attention on the last level.
        latent_channels: ``C`` (MAR's ``embed_dim``; the encoder's ``z_channels`` too, as in MAR).
        decoder_attn_levels: decoder levels with attention (MAR: none, ``[]``); None = the last level.
    """

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 latent_channels: int = 16, attn_levels: Sequence[int] | None = None,
                 decoder_attn_levels: Sequence[int] | None = (), mid_attn: bool = True, norm_groups: int = 32):
        super().__init__()
        if isinstance(latent_channels, bool) or not isinstance(latent_channels, int) or latent_channels < 1:
            raise ValueError(f"latent_channels must be a positive int, got {latent_channels!r}")
        self.encoder = Encoder(3, ch, ch_mult, num_res_blocks, latent_channels, double_z=True,
                               attn_levels=attn_levels, mid_attn=mid_attn, norm_groups=norm_groups)
        self.decoder = Decoder(3, ch, ch_mult, num_res_blocks, latent_channels, attn_levels=decoder_attn_levels,
                               mid_attn=mid_attn, norm_groups=norm_groups)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.latent_channels = latent_channels
        self.downsample_factor = self.encoder.downsample_factor

    def moments(self, images: Tensor) -> Tensor:
        """``images: [B, 3, H, W]`` → ``[B, 2C, H/f, W/f]`` (mean channels first, then log-variance)."""
        return self.quant_conv(self.encoder(images.contiguous(memory_format=torch.channels_last)))

    def decode(self, z: Tensor) -> Tensor:
        """``z: [B, C, h, w]`` (unscaled latent) → ``[B, 3, h*f, w*f]`` (not clamped)."""
        return self.decoder(self.post_quant_conv(z.contiguous(memory_format=torch.channels_last)))


class DiffusersAutoencoderKL(nn.Module):
    """:class:`diffusers.AutoencoderKL` (as ``.vae``) behind the same two calls as :class:`LDMAutoencoderKL`."""

    def __init__(self, **config):
        super().__init__()
        self.vae = AutoencoderKL(**config)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.downsample_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def moments(self, images: Tensor) -> Tensor:
        """``images: [B, 3, H, W]`` → ``[B, 2C, H/f, W/f]``."""
        return self.vae.encode(images).latent_dist.parameters

    def decode(self, z: Tensor) -> Tensor:
        """``z: [B, C, h, w]`` (unscaled latent) → ``[B, 3, h*f, w*f]`` (not clamped)."""
        return self.vae.decode(z).sample


def _per_channel(name: str, value, channels: int) -> Tensor:
    """A float or a list of ``channels`` floats → ``[channels]`` float32."""
    values = [value] * channels if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) != channels \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{name} must be a float or a list of {channels} floats (one per latent channel), "
                         f"got {value!r}")
    out = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if not torch.isfinite(out).all() or (name == "scaling_factor" and (out == 0).any()):
        raise ValueError(f"{name} must be finite{' and non-zero' if name == 'scaling_factor' else ''}, "
                         f"got {value!r}")
    return out


def _diffusers_config(vae: AutoencoderKL) -> dict:
    """The JSON-serialisable constructor arguments of an AutoencoderKL (its config without private keys)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.config.items() if not k.startswith("_")}


@register("kl_vae")
class KLVAETokenizer(ImageTokenizer):
    """Continuous tokens from a KL-regularised autoencoder (``spec``: ``continuous``, ``dim = C``, ``Grid``).

    Args:
        image_size: square image side the ``spec`` describes; divisible by the downsampling factor.
        architecture: ``"ldm"`` (tokenloom/MAR module tree) or ``"diffusers"`` (``diffusers.AutoencoderKL``).
        autoencoder_config: constructor arguments of that tree (:class:`LDMAutoencoderKL` or ``AutoencoderKL``);
            None = the small trainable default in :data:`DEFAULT_AUTOENCODERS`.
        scaling_factor: multiplies the shifted latent (float or one per channel); SD 1.x: 0.18215, MAR: 0.2325.
        shift_factor: subtracted from the latent before scaling (float or one per channel); SD3/Flux set it.
        kl_weight: weight of the KL term in the training loss (see the module docstring for its normalisation).
        recon_loss: ``"l1"`` or ``"mse"``.
        sample_posterior: the training forward decodes a posterior sample (True, as LDM) or the mean.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 32,
        architecture: str = "ldm",
        autoencoder_config: dict | None = None,
        scaling_factor: float | list[float] = 1.0,
        shift_factor: float | list[float] = 0.0,
        kl_weight: float = 1e-6,
        recon_loss: str = "l1",
        sample_posterior: bool = True,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        if isinstance(kl_weight, bool) or not isinstance(kl_weight, (int, float)) or kl_weight < 0:
            raise ValueError(f"kl_weight must be a float >= 0, got {kl_weight!r}")
        if autoencoder_config is not None and not isinstance(autoencoder_config, dict):
            raise TypeError(f"autoencoder_config must be a dict of constructor arguments or None, got "
                            f"{type(autoencoder_config).__name__}")
        config = dict(DEFAULT_AUTOENCODERS[architecture] if autoencoder_config is None else autoencoder_config)
        self.autoencoder = LDMAutoencoderKL(**config) if architecture == "ldm" else DiffusersAutoencoderKL(**config)
        self.downsample_factor = self.autoencoder.downsample_factor
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1 \
                or image_size % self.downsample_factor:
            raise ValueError(f"image_size must be a positive int divisible by the downsampling factor "
                             f"{self.downsample_factor}, got {image_size!r}")
        self.image_size = image_size
        channels = self.autoencoder.latent_channels
        self.register_buffer("latent_scale", _per_channel("scaling_factor", scaling_factor, channels),
                             persistent=False)
        self.register_buffer("latent_shift", _per_channel("shift_factor", shift_factor, channels),
                             persistent=False)
        self.kl_weight = float(kl_weight)
        self.recon_loss_name = recon_loss
        self.sample_posterior = bool(sample_posterior)

    # ---- loading and export ----
    @classmethod
    def from_diffusers(cls, path_or_model: str | AutoencoderKL, scaling_factor: float | list[float] | None = None,
                       shift_factor: float | list[float] | None = None, image_size: int | None = None,
                       subfolder: str | None = None, **kwargs) -> KLVAETokenizer:
        """A tokenizer around a diffusers ``AutoencoderKL`` (a local folder, or the model itself).

        ``scaling_factor``/``shift_factor`` default to the VAE's own config: ``scaling_factor`` and
        ``shift_factor`` (None → 0), or, when the config has ``latents_mean``/``latents_std``, per-channel
        ``shift = latents_mean`` and ``scale = scaling_factor / latents_std`` (diffusers' pipelines' formula).
        ``image_size`` defaults to the config's ``sample_size``. Other ``kwargs`` go to the constructor
        (``kl_weight``, ``recon_loss``, ...). Pass ``subfolder="vae"`` for a whole pipeline folder.
        """
        if isinstance(path_or_model, AutoencoderKL):
            vae = path_or_model
        elif isinstance(path_or_model, str):
            vae = AutoencoderKL.from_pretrained(path_or_model, subfolder=subfolder)
        else:
            raise TypeError(f"path_or_model must be a folder path or a diffusers.AutoencoderKL, got "
                            f"{type(path_or_model).__name__}")
        cfg = vae.config
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if scaling_factor is None:
            scaling_factor = float(cfg.scaling_factor)
            if std is not None:
                scaling_factor = [scaling_factor / float(s) for s in std]
        if shift_factor is None:
            shift_factor = [float(m) for m in mean] if mean is not None else float(cfg.get("shift_factor") or 0.0)
        if image_size is None:
            size = cfg.sample_size
            image_size = int(size[0] if isinstance(size, (list, tuple)) else size)
        tok = cls(image_size=image_size, architecture="diffusers",
                  autoencoder_config=_diffusers_config(vae),
                  scaling_factor=scaling_factor, shift_factor=shift_factor, **kwargs)
        tok.autoencoder.vae.load_state_dict(vae.state_dict(), strict=True)
        tok = tok.to(vae.device)
        return tok if vae.dtype == tok.dtype else tok.to(vae.dtype)

    def to_diffusers(self) -> AutoencoderKL:
        """The wrapped ``diffusers.AutoencoderKL`` (``architecture="diffusers"`` only; shares the weights)."""
        if self.config.architecture != "diffusers":
            raise ValueError(f"to_diffusers needs architecture='diffusers', this tokenizer has "
                             f"{self.config.architecture!r}")
        return self.autoencoder.vae

    @torch.no_grad()
    def calibrate_scaling(self, images: Tensor, shift: bool = False) -> float:
        """Set ``scaling_factor = 1 / std`` of the posterior means of ``images`` (LDM's recipe, a first batch), so
        that tokens have unit variance; with ``shift=True`` also ``shift_factor = mean``. Updates the config (saved
        by ``save_pretrained``) and returns the new scaling factor."""
        self.check_images(images)
        mean, _ = self.posterior(images)
        center = float(mean.mean()) if shift else 0.0
        std = float((mean - center).std())
        if not std > 0:
            raise ValueError(f"the posterior means of images have std {std}; cannot calibrate the scaling")
        self.latent_scale.fill_(1.0 / std)
        self.latent_shift.fill_(center)
        self.register_to_config(scaling_factor=1.0 / std, shift_factor=center)
        return 1.0 / std

    # ---- the contract ----
    @property
    def spec(self) -> TokenSpec:
        side = self.image_size // self.downsample_factor
        return TokenSpec(kind="continuous", dim=self.autoencoder.latent_channels, layout=Grid(side, side))

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``images: [B, 3, H, W]`` → ``(mean, logvar)``, each ``[B, C, h, w]`` (logvar clamped; no input checks)."""
        mean, logvar = self.autoencoder.moments(images).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def latent_to_tokens(self, z: Tensor) -> Tensor:
        """Unscaled latent ``[B, C, h, w]`` → scaled tokens ``[B, h*w, C]``."""
        return (z.flatten(2).transpose(1, 2) - self.latent_shift) * self.latent_scale

    def tokens_to_latent(self, data: Tensor) -> Tensor:
        """Scaled tokens ``[B, h*w, C]`` (this spec's grid) → unscaled latent ``[B, C, h, w]``."""
        grid = self.spec.layout
        z = data / self.latent_scale + self.latent_shift
        return z.transpose(1, 2).reshape(data.shape[0], -1, grid.h, grid.w)

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tokens:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` → ``Tokens`` ``[B, L, C]`` float: the scaled posterior mean, or
        a posterior sample (``sample=True``, drawn with ``generator``)."""
        self.check_images(images)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        mean, logvar = self.posterior(images)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return Tokens(self.latent_to_tokens(z), self.spec)

    def decode(self, tokens: Tokens) -> Tensor:
        """``Tokens`` of this spec → images ``[B, 3, H, W]`` (roughly ``[-1, 1]``, not clamped)."""
        self.check_tokens(tokens)
        return self.autoencoder.decode(self.tokens_to_latent(tokens.data.to(self.latent_scale.dtype)))

    def embed(self, tokens: Tokens) -> Tensor:
        """``Tokens`` → ``[B, L, C]``: the scaled latents themselves (continuous tokens are their own embedding)."""
        self.check_tokens(tokens)
        return tokens.data

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """Training step: ``images: [B, 3, H, W]`` → dict with ``loss``, ``recon`` ``[B, 3, H, W]``, ``recon_loss``,
        ``kl_loss`` (unweighted, normalised as in the module docstring) and ``latent_std`` (of the scaled mean)."""
        self.check_images(images)
        mean, logvar = self.posterior(images)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if self.sample_posterior else mean
        recon = self.autoencoder.decode(z)
        recon_loss = F.l1_loss(recon, images) if self.recon_loss_name == "l1" else F.mse_loss(recon, images)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean() / images[0].numel()
        return {
            "loss": recon_loss + self.kl_weight * kl,
            "recon": recon,
            "recon_loss": recon_loss.detach(),
            "kl_loss": kl.detach(),
            "latent_std": self.latent_to_tokens(mean.detach()).std(),
        }


__all__ = ["ARCHITECTURES", "DEFAULT_AUTOENCODERS", "DiffusersAutoencoderKL", "KLVAETokenizer", "LDMAutoencoderKL"]
