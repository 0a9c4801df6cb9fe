"""FlowAR-style rectified-flow head (``"flow"``): a velocity MLP on ``(x_t, t, z)``.

Convention (FlowAR's and diffusers' ``FlowMatch*`` schedulers'): ``t ∈ [0, 1]`` with ``t = 1`` pure noise,

    x_t = (1 − t)·x + t·ε,        velocity target  v = dx_t/dt = ε − x,

``t ~ U(0, 1)`` in training (``diffusion_batch_mul`` draws per row), loss = MSE over channels. The MLP sees
``1000·t`` as its timestep (the scale of diffusers' flow schedulers; FlowAR floors it to an integer, we keep
it fractional). Sampling integrates ``dx/dt = v`` from ``t = 1`` to ``0`` on ``linspace(1, 0, N + 1)``,
starting from ``noise_temperature · ε``: ``"euler"`` (N evaluations) or ``"heun"`` (Heun's 2nd order on every
step but the last, which is Euler: 2N − 1 evaluations, as diffusers' ``FlowMatchHeunDiscreteScheduler`` and
EDM) — or ``"sde"``, the stochastic sampler below. Guidance acts on the velocity, ``v_u + s·(v_c − v_u)``, at
every evaluation.

``"sde"`` (SiT, Ma et al. 2024): Euler–Maruyama on the reverse-time SDE with the flow's marginals. For this
interpolant (``α_t = 1 − t``, ``σ_t = t``) the score follows from the velocity, ``E[ε | x_t] = x_t + (1 − t)·v`` and
``s = −(x_t + (1 − t)·v)/t``; with SiT's default diffusion coefficient ``w(t) = σ_t = t`` the reverse SDE
``dx = [v − w/2·s] dt + sqrt(w) dW̄`` (``dt < 0``) has drift ``v + (x_t + (1 − t)·v)/2`` (no division by ``t``).
A step ``t → t_next > 0`` draws ``x' ~ N(x_t + (t_next − t)·drift, τ²·t·(t − t_next))`` (τ the noise temperature,
which also scales the initial noise); the last step (``t_next = 0``) is deterministic, the Euler ODE step
``x_t − t·v`` (the predicted ``x_0``, SiT's ``last_step="Euler"``): N evaluations, N − 1 Gaussian draws. Its
Gaussian steps give the trajectory a density (:class:`~tokenloom.generators.decoding.trajectory.FlowLaw`).

The steps are our own (a few lines) rather than diffusers' flow schedulers because those hold one scalar
time per call and a fixed grid; here every row carries its own ``t`` and ``t_next``, which block diffusion
and speculative decoding need. ``tests/test_flow_head.py`` checks both solvers against diffusers'.

Caller-driven loops::

    x = head.noise_temperature * head.randn((N, D), generator, like=z)
    for t, t_next in zip(ts[:-1], ts[1:]):          # per-row tensors [N] (or scalars)
        x = head.denoise_step(x, t, t_next, z, solver="heun")

    head.predict(x_t, t, z, z_uncond, guidance_scale)   # guided velocity [N, D]
    head.add_noise(x0, t, noise)                        # x_t
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenloom.config import SamplingParams
from tokenloom.heads import register
from tokenloom.heads.continuous import ContinuousHead, _non_negative_float
from tokenloom.tokens import TokenSpec

ODE_SOLVERS = ("euler", "heun")
SOLVERS = ODE_SOLVERS + ("sde",)
TIME_SCALE = 1000.0


@register("flow")
class FlowHead(ContinuousHead):
    """Rectified-flow head.

    Args:
        spec: ``kind="continuous"`` TokenSpec; ``D = spec.dim``.
        width: channels ``C`` of the backbone's ``z``.
        depth, mlp_width: the adaLN MLP's residual blocks and width.
        num_sampling_steps: ODE steps when ``params.num_steps`` is None.
        solver: ``"euler"``, ``"heun"`` (deterministic ODE) or ``"sde"`` (Euler–Maruyama, stochastic).
        noise_temperature: default scale of the initial noise (and, with ``"sde"``, of every step's noise).
        diffusion_batch_mul: times ``t`` drawn per row in ``loss``.
    """

    def __init__(self, spec: TokenSpec, width: int, *, depth: int = 3, mlp_width: int = 1024,
                 num_sampling_steps: int = 50, solver: str = "euler", noise_temperature: float = 1.0,
                 diffusion_batch_mul: int = 4):
        super().__init__(spec, width, depth=depth, mlp_width=mlp_width, out_factor=1,
                         num_sampling_steps=num_sampling_steps, noise_temperature=noise_temperature,
                         diffusion_batch_mul=diffusion_batch_mul)
        self.solver = self.check_solver(solver)

    @staticmethod
    def check_solver(solver: str) -> str:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        return solver

    def _times(self, t: Tensor | float, n: int, like: Tensor, name: str) -> Tensor:
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"{name} must be a scalar or a tensor of shape [{n}], got {tuple(t.shape)}")
        if not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"{name} must lie in [0, 1] (1 = noise), got min {float(t.min())}, max {float(t.max())}")
        return t

    # -- network -----------------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Velocity ``[N, D]`` at ``x_t: [N, D]``, ``t: [N]`` in [0, 1], ``z: [N, C]`` (no guidance)."""
        return self.net(x_t, t * TIME_SCALE, z)

    def predict(self, x_t: Tensor, t: Tensor | float, z: Tensor, z_uncond: Tensor | None = None,
                guidance_scale: float = 1.0) -> Tensor:
        """Guided velocity ``[N, D]``; ``t``: scalar or ``[N]`` in [0, 1]."""
        self.check_z(z)
        self.check_x(x_t, z.shape[0], "x_t")
        self.check_guidance(z, z_uncond, guidance_scale)
        t = self._times(t, z.shape[0], x_t, "t")
        return self.guided_net(x_t, t * TIME_SCALE, z, z_uncond, guidance_scale, guided_channels=self.dim)

    def add_noise(self, x0: Tensor, t: Tensor | float, noise: Tensor) -> Tensor:
        """``x_t = (1 − t)·x0 + t·noise``; ``x0, noise: [N, D]``, ``t``: scalar or ``[N]``."""
        t = self._times(t, x0.shape[0], x0, "t")[:, None]
        return (1 - t) * x0 + t * noise

    # -- training ----------------------------------------------------------------------------------------
    def training_losses(self, z: Tensor, x0: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """``{"loss"}``: per-row MSE ``[N]`` of the velocity at given ``t: [N]`` and ``noise: [N, D]``."""
        self.check_z(z)
        self.check_x(x0, z.shape[0], "target")
        self.check_x(noise, z.shape[0], "noise")
        x_t = self.add_noise(x0, t, noise)
        v = self.forward(x_t, self._times(t, z.shape[0], x0, "t"), z)
        return {"loss": (v - (noise - x0)).pow(2).mean(dim=-1)}

    def loss(self, z: Tensor, target: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``[N]``: the loss of each row averaged over ``diffusion_batch_mul`` random ``(t, noise)`` draws."""
        self.check_z(z)
        self.check_x(target, z.shape[0], "target")
        n, k = z.shape[0], self.diffusion_batch_mul
        z_k, x0_k = z.repeat(k, 1), target.to(z.dtype).repeat(k, 1)
        t = self.rand((n * k,), generator, like=z)
        noise = self.randn(tuple(x0_k.shape), generator, like=z)
        return self.training_losses(z_k, x0_k, t, noise)["loss"].view(k, n).mean(0)

    # -- sampling ----------------------------------------------------------------------------------------
    def sde_moments(self, x_t: Tensor, t: Tensor, t_next: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[N, D]`` and std ``[N]`` (at noise temperature 1) of one ``"sde"`` step from ``x_t: [N, D]`` with
        velocity ``v: [N, D]``, ``t, t_next: [N]`` (``t_next <= t``); rows with ``t_next = 0``: the Euler ODE step,
        std 0."""
        tt, dt = t[:, None], (t_next - t)[:, None]
        stochastic = t_next > 0
        drift = v + 0.5 * (x_t + (1 - tt) * v)  # v − w/2·s with w = t, s = −(x_t + (1 − t)·v)/t
        mean = torch.where(stochastic[:, None], x_t + dt * drift, x_t + dt * v)
        std = torch.where(stochastic, (t * (t - t_next)).clamp_min(0).sqrt(), torch.zeros_like(t))
        return mean, std

    def denoise_step(self, x_t: Tensor, t: Tensor | float, t_next: Tensor | float, z: Tensor, *,
                     z_uncond: Tensor | None = None, guidance_scale: float = 1.0,
                     solver: str | None = None, generator: torch.Generator | None = None,
                     noise_temperature: float | None = None) -> Tensor:
        """Move ``x_t: [N, D]`` from time ``t`` to ``t_next`` (scalars or ``[N]``; ``t_next < t`` denoises).

        ``"heun"`` corrects with the velocity at ``t_next`` on rows where ``t_next > 0`` (Euler elsewhere).
        ``"sde"`` needs ``t_next <= t`` and draws ``noise_temperature · N(0, I)`` noise from ``generator`` when some
        row has ``t_next > 0``.
        """
        solver = self.check_solver(self.solver if solver is None else solver)
        n = x_t.shape[0]
        t = self._times(t, n, x_t, "t")
        t_next = self._times(t_next, n, x_t, "t_next")
        dt = (t_next - t)[:, None]
        v = self.predict(x_t, t, z, z_uncond, guidance_scale)
        if solver == "sde":
            if not bool((t_next <= t).all()):
                raise ValueError(f"solver='sde' integrates from noise to data: t_next must be <= t, got "
                                 f"t {t.tolist()} and t_next {t_next.tolist()}")
            temp = _non_negative_float("noise_temperature",
                                       self.noise_temperature if noise_temperature is None else noise_temperature)
            mean, std = self.sde_moments(x_t, t, t_next, v)
            if not bool((std > 0).any()):
                return mean
            return mean + temp * std[:, None] * self.randn(tuple(x_t.shape), generator, like=x_t)
        x_next = x_t + dt * v
        if solver == "heun":
            corrected = t_next > 0
            if bool(corrected.any()):
                v_next = self.predict(x_next, t_next, z, z_uncond, guidance_scale)
                x_heun = x_t + dt * 0.5 * (v + v_next)
                x_next = torch.where(corrected[:, None], x_heun, x_next)
        return x_next

    @torch.no_grad()
    def sample(self, z: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
               z_uncond: Tensor | None = None, *, noise_temperature: float | None = None,
               solver: str | None = None, progress: bool = False) -> Tensor:
        """``[N, D]`` tokens by integrating from ``t = 1`` to ``0`` in ``num_steps`` uniform steps; only
        ``num_steps`` and ``guidance_scale`` of ``params`` apply."""
        self.check_z(z)
        steps, temp = self.resolve(params, noise_temperature)
        self.check_guidance(z, z_uncond, params.guidance_scale)
        times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
        x = temp * self.randn((z.shape[0], self.dim), generator, like=z)
        for t, t_next in tqdm(list(zip(times[:-1], times[1:])), disable=not progress, desc="flow head"):
            x = self.denoise_step(x, t, t_next, z, z_uncond=z_uncond, guidance_scale=params.guidance_scale,
                                  solver=solver, generator=generator, noise_temperature=temp)
        return x
