"""What the diffusion-loss and flow-matching heads share: the adaLN MLP, input checks, guidance, RNG.

Both heads model ``p(x | z)`` for a continuous token ``x: [N, D]`` (``D = spec.dim``) given the backbone's
``z: [N, C]`` (``C = width``) with :class:`~tokenloom.heads.mlp_denoiser.AdaLNMLPDenoiser` as ``self.net``.
Classifier-free guidance combines a conditional and an unconditional pass on the *same* ``x_t``:
``uncond + s·(cond − uncond)`` (MAR, FlowAR); ``s = 1`` skips the unconditional pass.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.heads.base import Head
from tokenloom.heads.mlp_denoiser import AdaLNMLPDenoiser
from tokenloom.tokens import TokenSpec


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _non_negative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class ContinuousHead(Head):
    """Base of the heads for ``"continuous"`` tokens; see the module docstring.

    Args:
        spec: a ``kind="continuous"`` TokenSpec (``spec.dim`` = ``D``).
        width: channels ``C`` of the backbone's ``z``.
        depth: residual blocks of the MLP.
        mlp_width: hidden width of the MLP.
        out_factor: the MLP outputs ``out_factor · D`` channels.
        num_sampling_steps: steps of ``sample`` when ``params.num_steps`` is None.
        noise_temperature: default noise scale of ``sample`` (1.0 = the model's distribution).
        diffusion_batch_mul: noise levels drawn per ``(z, target)`` row in ``loss`` (MAR: 4).
    """

    kinds = ("continuous",)

    def __init__(self, spec: TokenSpec, width: int, *, depth: int, mlp_width: int, out_factor: int,
                 num_sampling_steps: int, noise_temperature: float, diffusion_batch_mul: int):
        super().__init__(spec, width)
        _positive_int("width", width)
        self.num_sampling_steps = _positive_int("num_sampling_steps", num_sampling_steps)
        self.noise_temperature = _non_negative_float("noise_temperature", noise_temperature)
        self.diffusion_batch_mul = _positive_int("diffusion_batch_mul", diffusion_batch_mul)
        self.dim = spec.dim
        self.net = AdaLNMLPDenoiser(spec.dim, _positive_int("mlp_width", mlp_width), out_factor * spec.dim, width,
                                    _positive_int("depth", depth))

    # -- checks ------------------------------------------------------------------------------------------
    def check_z(self, z: Tensor, name: str = "z") -> None:
        if not isinstance(z, Tensor) or not z.is_floating_point():
            raise TypeError(f"{name} must be a float tensor [N, {self.width}], got "
                            f"{z.dtype if isinstance(z, Tensor) else type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.width:
            raise ValueError(f"{name} must have shape [N, {self.width}] (the head's width), got {tuple(z.shape)}")

    def check_x(self, x: Tensor, n: int, name: str) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a float tensor [N, {self.dim}], got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
        if x.dim() != 2 or x.shape != (n, self.dim):
            raise ValueError(f"{name} must have shape [{n}, {self.dim}] (N rows of z, spec.dim channels), got "
                             f"{tuple(x.shape)}")

    def check_guidance(self, z: Tensor, z_uncond: Tensor | None, guidance_scale: float) -> None:
        _non_negative_float("guidance_scale", guidance_scale)
        if z_uncond is not None:
            self.check_z(z_uncond, "z_uncond")
            if z_uncond.shape != z.shape:
                raise ValueError(f"z_uncond must have the shape of z {tuple(z.shape)}, got {tuple(z_uncond.shape)}")
        elif guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs z_uncond (the unconditional z); pass it or "
                             f"use guidance_scale=1.0")

    def check_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")

    # -- network with guidance ---------------------------------------------------------------------------
    def guided_net(self, x_t: Tensor, t_model: Tensor, z: Tensor, z_uncond: Tensor | None,
                   guidance_scale: float, guided_channels: int) -> Tensor:
        """``net(x_t, t_model, z)`` with its first ``guided_channels`` channels guided by ``z_uncond``.

        The remaining channels (MAR's variance values) come from the conditional pass.
        """
        if z_uncond is None or guidance_scale == 1.0:
            return self.net(x_t, t_model, z)
        out = self.net(torch.cat([x_t, x_t]), torch.cat([t_model, t_model]), torch.cat([z, z_uncond]))
        cond, uncond = out.chunk(2)
        g = guided_channels
        guided = uncond[:, :g] + guidance_scale * (cond[:, :g] - uncond[:, :g])
        return torch.cat([guided, cond[:, g:]], dim=-1)

    # -- randomness --------------------------------------------------------------------------------------
    @staticmethod
    def randn(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
        return randn_tensor(shape, generator=generator, device=like.device, dtype=like.dtype)

    @staticmethod
    def rand(shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
        device = generator.device if generator is not None else like.device
        return torch.rand(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)

    @staticmethod
    def randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None, like: Tensor) -> Tensor:
        device = generator.device if generator is not None else like.device
        return torch.randint(0, high, shape, generator=generator, device=device).to(like.device)

    def resolve(self, params: SamplingParams, noise_temperature: float | None) -> tuple[int, float]:
        """(steps, noise temperature) of a ``sample`` call."""
        self.check_params(params)
        steps = self.num_sampling_steps if params.num_steps is None else params.num_steps
        temp = self.noise_temperature if noise_temperature is None else noise_temperature
        return steps, _non_negative_float("noise_temperature", temp)
