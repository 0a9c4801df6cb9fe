"""MAR's diffusion-loss head (``"diffusion"``): ``p(x | z)`` by a small denoising MLP conditioned on z and t.

As MAR's ``DiffLoss``: 1000-step cosine schedule, epsilon prediction with a learned-range variance
(the MLP outputs ``2D`` channels), loss = eps-MSE + variational bound, ``diffusion_batch_mul`` noise levels
per ``(z, target)`` row; sampling runs a respaced chain of ``num_steps`` (default 100) steps with DDPM
ancestral updates whose noise is multiplied by ``noise_temperature``; guidance acts on the noise prediction
``eps_u + s·(eps_c − eps_u)`` (variance values from the conditional pass). The math lives, stateless, in
:mod:`tokenloom.heads.schedules`.

Caller-driven loops (block diffusion, speculative decoding) — every call is per row, so rows may sit at
different steps::

    chain = head.chain(num_steps)                      # GaussianDiffusion, steps 0..S-1 (S-1 = pure noise)
    x = head.randn((N, D), generator, like=z)
    for j in reversed(range(S)):                       # or any per-row schedule of step indices
        x = head.denoise_step(x, torch.full((N,), j), z, chain, generator=generator)

    head.predict(x_t, t, z, z_uncond, s)   # MLP output [N, 2D] (guided eps | v) at original timesteps t: [N]
    chain.model_timesteps(step)            # step indices of a respaced chain -> original timesteps
    head.add_noise(x0, t, noise)           # q(x_t | x0) on the 1000-step training chain

Measured caveat (tests/test_diffusion_head.py): the first step of every respaced chain starts at t = 999, where
``pred_x0 ≈ 2·10⁴ (x_t − eps)``; the posterior mean multiplies an eps error by ~300 (100 steps) or ~600
(50 steps). A toy MLP after a few thousand updates still errs by ~0.02 there and its samples blow up, so
briefly trained heads need ``clip_denoised`` (off by default, as in MAR).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenloom.config import SamplingParams
from tokenloom.heads import register
from tokenloom.heads.continuous import ContinuousHead, _non_negative_float, _positive_int
from tokenloom.heads.schedules import GaussianDiffusion
from tokenloom.tokens import TokenSpec


@register("diffusion")
class DiffusionHead(ContinuousHead):
    """MAR's DiffLoss as a head.

    Args:
        spec: ``kind="continuous"`` TokenSpec; ``D = spec.dim``.
        width: channels ``C`` of the backbone's ``z``.
        depth: residual blocks of the MLP (MAR ``diffloss_d``, 3).
        mlp_width: MLP width (MAR ``diffloss_w``, 1024).
        num_sampling_steps: respaced sampling steps when ``params.num_steps`` is None (MAR: 100).
        noise_temperature: default multiplier of the per-step noise (MAR's ``temperature``).
        diffusion_batch_mul: timesteps drawn per row in ``loss`` (MAR: 4).
        num_train_steps: steps of the training chain (MAR: 1000).
        clip_denoised: clamp the predicted x0 to ``[-c, c]`` while sampling (IDDPM's ``clip_denoised`` with a
            range; MAR: None). The first step of a respaced chain starts at t = 999 where
            ``pred_x0 = 2·10⁴ (x_t − eps)``: it multiplies eps errors by ~300 (100 steps), and a briefly
            trained MLP's samples blow up unless its tokens' range is known and clipped.
    """

    def __init__(self, spec: TokenSpec, width: int, *, depth: int = 3, mlp_width: int = 1024,
                 num_sampling_steps: int = 100, noise_temperature: float = 1.0, diffusion_batch_mul: int = 4,
                 num_train_steps: int = 1000, clip_denoised: float | None = None):
        super().__init__(spec, width, depth=depth, mlp_width=mlp_width, out_factor=2,
                         num_sampling_steps=num_sampling_steps, noise_temperature=noise_temperature,
                         diffusion_batch_mul=diffusion_batch_mul)
        self.num_train_steps = _positive_int("num_train_steps", num_train_steps)
        if num_sampling_steps > num_train_steps:
            raise ValueError(f"num_sampling_steps must be <= num_train_steps={num_train_steps}, "
                             f"got {num_sampling_steps}")
        if clip_denoised is not None:
            clip_denoised = _non_negative_float("clip_denoised", clip_denoised)
            if clip_denoised == 0:
                raise ValueError("clip_denoised must be None (off) or > 0, got 0")
        self.clip_denoised = clip_denoised
        self.train_chain = GaussianDiffusion.cosine(num_train_steps)

    def chain(self, num_steps: int | None = None) -> GaussianDiffusion:
        """The respaced sampling chain of ``num_steps`` steps (default ``num_sampling_steps``); cached."""
        steps = self.num_sampling_steps if num_steps is None else num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.num_train_steps:
            raise ValueError(f"num_steps must be an int in [1, {self.num_train_steps}], got {steps!r}")
        return GaussianDiffusion.cosine(self.num_train_steps, steps)

    # -- network -----------------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """The MLP: ``x_t: [N, D]``, ``t: [N]`` original timesteps (0..999), ``z: [N, C]`` → ``[N, 2D]``."""
        return self.net(x_t, t, z)

    def predict(self, x_t: Tensor, t: Tensor, z: Tensor, z_uncond: Tensor | None = None,
                guidance_scale: float = 1.0) -> Tensor:
        """``[N, 2D]``: guided noise prediction ``eps`` then the conditional variance values ``v``."""
        self.check_z(z)
        self.check_x(x_t, z.shape[0], "x_t")
        self.check_guidance(z, z_uncond, guidance_scale)
        if not isinstance(t, Tensor) or t.shape != (z.shape[0],):
            raise ValueError(f"t must be a tensor of shape [{z.shape[0]}], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        return self.guided_net(x_t, t, z, z_uncond, guidance_scale, guided_channels=self.dim)

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t`` of the training chain at original timesteps ``t: [N]`` long; ``x0, noise: [N, D]``."""
        self.train_chain.check_step(t, "t")
        return self.train_chain.q_sample(x0, t, noise)

    # -- training ----------------------------------------------------------------------------------------
    def training_losses(self, z: Tensor, x0: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """MAR's per-row loss terms ``{"loss", "mse", "vb"}`` (each ``[N]``) at given timesteps and noise."""
        self.check_z(z)
        self.check_x(x0, z.shape[0], "target")
        self.check_x(noise, z.shape[0], "noise")
        self.train_chain.check_step(t, "t")
        x_t = self.train_chain.q_sample(x0, t, noise)
        out = self.net(x_t, self.train_chain.model_timesteps(t), z)
        return self.train_chain.training_losses(out, x0, x_t, t, noise)

    def loss(self, z: Tensor, target: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``[N]``: the loss of each row averaged over ``diffusion_batch_mul`` random (timestep, noise) draws."""
        self.check_z(z)
        self.check_x(target, z.shape[0], "target")
        n, k = z.shape[0], self.diffusion_batch_mul
        z_k, x0_k = z.repeat(k, 1), target.to(z.dtype).repeat(k, 1)
        t = self.randint(self.num_train_steps, (n * k,), generator, like=z)
        noise = self.randn(tuple(x0_k.shape), generator, like=z)
        return self.training_losses(z_k, x0_k, t, noise)["loss"].view(k, n).mean(0)

    # -- sampling ----------------------------------------------------------------------------------------
    def denoise_step(self, x_t: Tensor, step: Tensor, z: Tensor, chain: GaussianDiffusion, *,
                     generator: torch.Generator | None = None, z_uncond: Tensor | None = None,
                     guidance_scale: float = 1.0, noise_temperature: float | None = None) -> Tensor:
        """One ancestral step per row: ``x_t`` at ``chain`` step ``step[i]`` → ``x`` at step ``step[i] − 1``
        (rows at step 0 return the final, noise-free mean). ``step: [N]`` long."""
        chain.check_step(step)
        temp = _non_negative_float("noise_temperature",
                                   self.noise_temperature if noise_temperature is None else noise_temperature)
        out = self.predict(x_t, chain.model_timesteps(step), z, z_uncond, guidance_scale)
        noise = self.randn(tuple(x_t.shape), generator, like=x_t) if bool((step != 0).any()) else None
        return chain.p_sample(out, x_t, step, noise, temp, self.clip_denoised)

    @torch.no_grad()
    def sample(self, z: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
               z_uncond: Tensor | None = None, *, noise_temperature: float | None = None,
               progress: bool = False) -> Tensor:
        """``[N, D]`` tokens from ``num_steps`` respaced DDPM steps; ``params.guidance_scale`` as scheduled by
        the caller. Only ``num_steps`` and ``guidance_scale`` of ``params`` apply."""
        self.check_z(z)
        steps, temp = self.resolve(params, noise_temperature)
        self.check_guidance(z, z_uncond, params.guidance_scale)
        chain = self.chain(steps)
        x = self.randn((z.shape[0], self.dim), generator, like=z)
        for j in tqdm(range(chain.num_steps - 1, -1, -1), disable=not progress, desc="diffusion head"):
            step = torch.full((z.shape[0],), j, dtype=torch.long, device=z.device)
            x = self.denoise_step(x, step, z, chain, generator=generator, z_uncond=z_uncond,
                                  guidance_scale=params.guidance_scale, noise_temperature=temp)
        return x
