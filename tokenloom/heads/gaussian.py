"""Diagonal-Gaussian head (``"gaussian"``) for continuous tokens: ``p(x | z) = N(mean(z), diag(exp(log_var(z))))``.

Why it exists: continuous speculative decoding (:mod:`tokenloom.generators.decoding.continuous_sd`) needs the
density of each token under the draft and the target model. Diffusion and flow heads have none in closed form; this
head does (``log_prob``), so speculative decoding over it is exact. It is a two-layer MLP on ``z`` giving the mean
and the log-variance of each of the ``D = spec.dim`` channels, trained by negative log-likelihood.

Sampling: ``params.temperature`` scales the standard deviation (0 = the mean); guidance acts on the mean,
``mean_u + s·(mean_c − mean_u)``, the variance comes from the conditional pass. The density of what ``sample``
draws is ``log_prob(x, z, params, z_uncond)`` with the same params (temperature > 0).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from tokenloom.config import SamplingParams
from tokenloom.heads import register
from tokenloom.heads.base import Head
from tokenloom.tokens import TokenSpec

LOG_VAR_RANGE = (-14.0, 10.0)


@register("gaussian")
class GaussianHead(Head):
    """Mean / log-variance MLP on ``z``.

    Args:
        spec: ``kind="continuous"`` TokenSpec; ``D = spec.dim``.
        width: channels ``C`` of the backbone's ``z``.
        mlp_width: hidden width of the MLP (0 = a single Linear ``C → 2D``).

    The last Linear is ``self.proj`` (``[2D, hidden]``: mean rows first, then log-variance rows); RasterAR starts it
    at zero, i.e. ``N(0, I)``.
    """

    kinds = ("continuous",)

    def __init__(self, spec: TokenSpec, width: int, mlp_width: int = 256):
        super().__init__(spec, width)
        if isinstance(mlp_width, bool) or not isinstance(mlp_width, int) or mlp_width < 0:
            raise ValueError(f"mlp_width must be an int >= 0, got {mlp_width!r}")
        self.dim = spec.dim
        self.hidden = nn.Sequential(nn.Linear(width, mlp_width), nn.SiLU()) if mlp_width else nn.Identity()
        self.proj = nn.Linear(mlp_width or width, 2 * spec.dim)

    def moments(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z: [N, C]`` → ``mean [N, D]``, ``log_var [N, D]`` (clamped to ``LOG_VAR_RANGE``)."""
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.width:
            raise ValueError(f"z must be a tensor [N, {self.width}], got "
                             f"{tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__}")
        mean, log_var = self.proj(self.hidden(z)).float().chunk(2, dim=-1)
        return mean, log_var.clamp(*LOG_VAR_RANGE)

    def distribution(self, z: Tensor, params: SamplingParams, z_uncond: Tensor | None = None
                     ) -> tuple[Tensor, Tensor]:
        """Sampling distribution ``(mean [N, D], std [N, D])`` under ``params`` (guidance, temperature)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        mean, log_var = self.moments(z)
        s = params.guidance_scale
        if s != 1.0:
            if z_uncond is None or z_uncond.shape != z.shape:
                raise ValueError(f"guidance_scale={s} needs z_uncond of shape {tuple(z.shape)}, got "
                                 f"{None if z_uncond is None else tuple(z_uncond.shape)}")
            mean_u, _ = self.moments(z_uncond)
            mean = mean_u + s * (mean - mean_u)
        temp = params.temperature
        temp = temp.to(mean).reshape(-1, 1) if isinstance(temp, Tensor) else float(temp)
        return mean, (0.5 * log_var).exp() * temp

    def log_prob(self, x: Tensor, z: Tensor, params: SamplingParams, z_uncond: Tensor | None = None) -> Tensor:
        """``log p(x | z)`` ``[N]`` (float32) of ``x: [N, D]`` under the sampling distribution of ``params``."""
        mean, std = self.distribution(z, params, z_uncond)
        if not bool((std > 0).all()):
            raise ValueError("log_prob needs temperature > 0 (temperature 0 is a point mass: no density)")
        if x.shape != mean.shape:
            raise ValueError(f"x must have shape {tuple(mean.shape)}, got {tuple(x.shape)}")
        r = (x.float() - mean) / std
        return (-0.5 * r.square() - std.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def loss(self, z: Tensor, target: Tensor) -> Tensor:
        """Negative log-likelihood ``[N]`` of ``target: [N, D]`` (nats, summed over channels)."""
        return -self.log_prob(target, z, SamplingParams())

    def sample(self, z: Tensor, params: SamplingParams, generator: torch.Generator | list | None = None,
               z_uncond: Tensor | None = None) -> Tensor:
        """Draw ``[N, D]`` values; ``generator`` may be a list of ``N`` (one per row)."""
        mean, std = self.distribution(z, params, z_uncond)
        eps = randn_tensor(tuple(mean.shape), generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * eps).to(z.dtype)
