"""Token laws for continuous speculative decoding: the random variable a head samples, and its density.

:class:`~tokenloom.generators.decoding.continuous_sd.ContinuousSD` accepts or rejects a *variable* ``V`` whose last
entry is the token. Each law draws ``V`` exactly as the head's own ``sample`` does (same arithmetic, same random
draws in the same order) and scores any ``V`` under its model. Shapes: ``z, z_uncond: [N, C]``, ``V: [N, K, D]``.

* :class:`GaussianLaw` (``"gaussian"`` head): ``V = (x,)`` and the head's ``log_prob``.
* :class:`DiffusionLaw` (``"diffusion"`` head, DDPM ancestral sampling with ``S`` steps, ``noise_temperature``
  τ > 0): ``V = (x_S, x_{S-1}, …, x_1, y)`` — the initial noise, the states after every stochastic step, and the
  token ``y = f(x_1)``, the deterministic last step (step 0, the mean without noise, as MAR).

Density of a diffusion trajectory (CSpD's idea, Wang et al. 2024, with every random draw part of the variable):
``x_S ~ N(0, I)`` and step ``j >= 1`` draws ``x_j ~ N(mean(x_{j+1}, j), (τ·exp(log_var(x_{j+1}, j) / 2))²)``
elementwise — ``mean`` and ``log_var`` from the guided network output through
:meth:`GaussianDiffusion.p_mean_variance`, exactly what :meth:`GaussianDiffusion.p_sample` adds the noise to. So
``p(x_S, …, x_1) = N(x_S; 0, I) ∏_j N(x_j; mean_j, σ_j²)``, a product of Gaussians evaluated on the trajectory.

The deterministic last step (why the variable ends in ``y``, not ``x_1``): draft and target share the variable
``U = (x_S, …, x_2, y)``, whose density under model ``m`` is, by the change of variables ``x_1 = f_m^{-1}(y)``,

    p_m(U) = p_m(x_S, …, x_2, x_1 = f_m^{-1}(y)) / |det ∂f_m/∂x (f_m^{-1}(y))|.

*Proof that speculative sampling on U is exact.* The target's sampler draws ``U ~ p_t`` and outputs ``y``, the last
coordinate of ``U``; speculative sampling with densities over ``U`` outputs ``U ~ p_t`` (Leviathan et al.), hence
``y`` is distributed as the target's token. The token fed to the next AR position is the accepted ``y`` itself, so
the target's scores of the following positions in the same pass stay valid. (Accepting on ``(x_S, …, x_1)`` and
outputting the *target's* ``f_t(x_1)`` is exact for one token too, but the draft's next proposals and the target's
pass were conditioned on ``f_d(x_1) ≠ f_t(x_1)``: every round would end after one token. Outputting the draft's
``f_d(x_1)`` without the Jacobian is biased; ``tests/test_decoding_continuous.py`` detects it.)

``f_m(x) = mean(x, 0) = sqrt(1/ᾱ_0)·x − sqrt(1/ᾱ_0 − 1)·eps_m(x)`` must be injective: it is when
``sqrt(1/ᾱ_0 − 1)·Lip(eps_m) < sqrt(1/ᾱ_0)`` (MAR's 1000-step cosine chain: ``sqrt(1/ᾱ_0 − 1) = 0.0064``).
``f_m^{-1}(y)`` is found by Newton's method on the head (the Jacobian by autograd, ``D`` backward passes) to a
residual ``<= INVERSE_TOL · (1 + |y|)``, else a ``RuntimeError``; the inversion residual is the one departure from
exactness beyond float rounding. ``clip_denoised`` (a clamp inside ``f``, not injective) and τ = 0 (no density) are
refused by :func:`law_for` / :meth:`DiffusionLaw.resolve`.

Flow heads (``"flow"``) with ``solver="sde"`` (:class:`FlowLaw`, Euler–Maruyama with ``N`` steps on
``linspace(1, 0, N + 1)``, τ > 0): ``V = (x_N, …, x_1, y)`` — the initial noise ``x_N ~ N(0, τ² I)`` (time 1), the
states after the ``N − 1`` stochastic steps, ``x_j ~ N(mean_j, (τ·std_j)²)`` with ``mean_j, std_j`` from
:meth:`FlowHead.sde_moments` on the guided velocity, and the token ``y = f(x_1) = x_1 − t_1·v(x_1, t_1)``, the
deterministic last step (the Euler ODE step from ``t_1 = 1/N``). Density, change of variables and Newton inverse
are the diffusion case's above; ``f`` is injective when ``t_1·Lip(v(·, t_1)) < 1``. With the deterministic ODE
solvers (``"euler"``, ``"heun"``) there is no stochastic step and no trajectory density; :func:`law_for` refuses
them and names ``solver="sde"``.

Cost counters (per law): ``evals`` — denoiser evaluations of one token at one step (a guided pair counts once),
``jacobians`` — Jacobians of ``f`` (``D`` backward passes each), ``calls`` — batched network calls.

Written here because no library scores DDPM or flow-SDE trajectories of a MAR head under a second model; the
arithmetic is the head's own (``predict``, ``chain``, ``p_mean_variance``, ``p_sample``, ``sde_moments``, ``randn``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.heads.diffusion import DiffusionHead
from tokenloom.heads.flow import ODE_SOLVERS, FlowHead
from tokenloom.heads.gaussian import GaussianHead

INVERSE_TOL = 1e-6
INVERSE_MAX_ITERS = 30
_LOG_2PI = math.log(2 * math.pi)


def normal_log_prob(x: Tensor, mean: Tensor | float, log_std: Tensor | float) -> Tensor:
    """float64 ``log N(x; mean, exp(log_std)²)`` summed over the last dim: ``[N, D]`` → ``[N]``."""
    x = x.double()
    mean = mean.double() if isinstance(mean, Tensor) else mean
    log_std = log_std.double() if isinstance(log_std, Tensor) else torch.tensor(log_std, dtype=torch.float64)
    r = (x - mean) * torch.exp(-log_std)
    return (-0.5 * r.square() - log_std - 0.5 * _LOG_2PI).expand_as(x).sum(-1)


class TokenLaw:
    """Base: ``sample`` draws ``V`` as the head's ``sample`` does; ``log_prob`` scores a ``V``."""

    def __init__(self, head):
        self.head = head
        self.evals = self.jacobians = self.calls = 0

    def size(self, params: SamplingParams) -> int:
        """``K``: entries of the variable ``V: [N, K, D]`` under ``params``."""
        raise NotImplementedError

    def evals_per_token(self, params: SamplingParams) -> int:
        """Network evaluations of the head's own ``sample`` per token."""
        return 1

    def count_sample(self, n: int, params: SamplingParams) -> None:
        """Count one ``head.sample`` call on ``n`` rows."""
        k = self.evals_per_token(params)
        self.evals, self.calls = self.evals + n * k, self.calls + k

    def sample(self, z: Tensor, z_uncond: Tensor | None, params: SamplingParams, generator,
               with_log_prob: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(V [N, K, D], log p(V) [N] float64 or None)``."""
        raise NotImplementedError

    def log_prob(self, v: Tensor, z: Tensor, z_uncond: Tensor | None, params: SamplingParams) -> Tensor:
        """``log p(V) [N]`` float64."""
        raise NotImplementedError


class GaussianLaw(TokenLaw):
    """``V = (x,)`` under :class:`GaussianHead` (closed-form density)."""

    def size(self, params: SamplingParams) -> int:
        return 1

    def sample(self, z, z_uncond, params, generator, with_log_prob=True):
        x = self.head.sample(z, params, generator, z_uncond=z_uncond).float()
        self.evals, self.calls = self.evals + z.shape[0], self.calls + 1
        return x[:, None], (self.log_prob(x[:, None], z, z_uncond, params) if with_log_prob else None)

    def log_prob(self, v, z, z_uncond, params):
        self.evals, self.calls = self.evals + z.shape[0], self.calls + 1
        return self.head.log_prob(v[:, 0], z, params, z_uncond).double()


class TrajectoryLaw(TokenLaw):
    """Base of the trajectory laws: ``V = (x_S, …, x_1, y)``, ``S`` steps of which the last, ``y = f(x_1)``, is
    deterministic (see the module docstring). Subclasses give ``schedule``, ``_final``, ``sample`` and
    ``states_log_prob``.

    ``V: [N, S + 1, D]``; ``log_prob`` reads ``x_S, …, x_2`` and ``y`` (``x_1`` is recomputed as ``f^{-1}(y)``).
    """

    kind = "trajectory"

    def resolve(self, params: SamplingParams) -> tuple[int, float]:
        steps, temp = self.head.resolve(params, None)
        if temp == 0:
            raise ValueError(f"ContinuousSD: the {self.kind} head {type(self.head).__name__} has noise_temperature=0: "
                             f"every denoising step is deterministic and the trajectory has no density; use "
                             f"noise_temperature > 0")
        return steps, temp

    def size(self, params: SamplingParams) -> int:
        return self.resolve(params)[0] + 1

    def evals_per_token(self, params: SamplingParams) -> int:
        return self.resolve(params)[0]

    def schedule(self, steps: int):
        """What ``_final`` needs besides the network inputs, for ``steps`` steps."""
        raise NotImplementedError

    def _final(self, x: Tensor, z: Tensor, z_uncond: Tensor | None, s: float, schedule) -> tuple[Tensor, Tensor]:
        """``f(x) [N, D]`` (the deterministic last step) and its Jacobian ``[N, D, D]`` (out, in)."""
        raise NotImplementedError

    def states_log_prob(self, states: Tensor, z: Tensor, z_uncond: Tensor | None, params: SamplingParams) -> Tensor:
        """``log p(x_S, …, x_1)`` ``[N]`` of the stochastic states ``states: [N, S, D]``."""
        raise NotImplementedError

    def _jacobian(self, fn, x: Tensor) -> tuple[Tensor, Tensor]:
        """``fn(x) [N, D]`` and its row-wise Jacobian ``[N, D, D]`` (out, in) by ``D`` backward passes."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            fx = fn(xg)
            d = fx.shape[1]
            rows = [torch.autograd.grad(fx[:, i].sum(), xg, retain_graph=i < d - 1)[0] for i in range(d)]
        self.jacobians += x.shape[0]
        return fx.detach(), torch.stack(rows, 1).detach()

    @staticmethod
    def _log_abs_det(jac: Tensor) -> Tensor:
        sign, logabs = torch.linalg.slogdet(jac.double())
        if not bool((sign != 0).all()):
            raise RuntimeError("ContinuousSD: the last denoising step f has a singular Jacobian; the change of "
                               "variables needs an injective f (see tokenloom/generators/decoding/trajectory.py)")
        return logabs

    def _invert(self, y: Tensor, z, z_uncond, s, schedule) -> tuple[Tensor, Tensor]:
        """Newton's method for ``x`` with ``f(x) = y`` → ``(x [N, D], log|det ∂f/∂x(x)| [N])``."""
        x, tol = y.clone(), INVERSE_TOL * (1 + y.abs())
        for _ in range(INVERSE_MAX_ITERS):
            fx, jac = self._final(x, z, z_uncond, s, schedule)
            r = fx - y
            todo = ~(r.abs() <= tol).all(-1)
            if not bool(todo.any()):
                return x, self._log_abs_det(jac)
            dx = torch.linalg.solve(jac.double(), r.double().unsqueeze(-1)).squeeze(-1)
            x = torch.where(todo[:, None], x - dx.to(x.dtype), x)
        raise RuntimeError(f"ContinuousSD: inverting the last denoising step did not converge in "
                           f"{INVERSE_MAX_ITERS} Newton steps (residual {float(r.abs().max()):.3g}); f must be "
                           f"injective (see tokenloom/generators/decoding/trajectory.py)")

    def log_prob(self, v, z, z_uncond, params):
        steps = self.resolve(params)[0]
        if v.dim() != 3 or v.shape[1] != steps + 1:
            raise ValueError(f"a {steps}-step {self.kind} trajectory must have shape [N, {steps + 1}, D], got "
                             f"{tuple(v.shape)}")
        v = v.to(z.dtype)
        x1, log_det = self._invert(v[:, -1], z, z_uncond, params.guidance_scale, self.schedule(steps))
        states = torch.cat([v[:, :steps - 1], x1[:, None]], 1)  # x_S, …, x_2, f^{-1}(y): [N, S, D]
        return self.states_log_prob(states, z, z_uncond, params) - log_det


class DiffusionLaw(TrajectoryLaw):
    """``V = (x_S, …, x_1, y)`` under :class:`DiffusionHead`'s ancestral sampler (see the module docstring)."""

    kind = "diffusion"

    def schedule(self, steps: int):
        return self.head.chain(steps)

    # -- the head's arithmetic -------------------------------------------------------------------------------
    def _out(self, x: Tensor, step: Tensor, z: Tensor, z_uncond: Tensor | None, s: float, chain) -> Tensor:
        self.evals, self.calls = self.evals + x.shape[0], self.calls + 1
        return self.head.predict(x, chain.model_timesteps(step), z, z_uncond, s)

    def _final(self, x: Tensor, z: Tensor, z_uncond: Tensor | None, s: float, chain) -> tuple[Tensor, Tensor]:
        """``f(x) [N, D]`` (step 0, what ``p_sample`` returns there) and its Jacobian ``[N, D, D]`` (out, in)."""
        step = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self._jacobian(lambda xg: chain.p_sample(self._out(xg, step, z, z_uncond, s, chain), xg, step, None,
                                                        clip_denoised=self.head.clip_denoised), x)

    # -- the law ---------------------------------------------------------------------------------------------
    def sample(self, z, z_uncond, params, generator, with_log_prob=True):
        steps, temp = self.resolve(params)
        chain, s, n, head = self.head.chain(steps), params.guidance_scale, z.shape[0], self.head
        x = head.randn((n, head.dim), generator, like=z)  # as DiffusionHead.sample: x_S ~ N(0, I)
        states = [x]
        log_p = normal_log_prob(x, 0.0, 0.0) if with_log_prob else None
        for j in range(steps - 1, 0, -1):
            step = torch.full((n,), j, dtype=torch.long, device=z.device)
            out = self._out(x, step, z, z_uncond, s, chain)
            noise = head.randn(tuple(x.shape), generator, like=x)
            x_next = chain.p_sample(out, x, step, noise, temp, head.clip_denoised)
            if with_log_prob:
                mv = chain.p_mean_variance(out, x, step, head.clip_denoised)
                log_p = log_p + normal_log_prob(x_next, mv["mean"], 0.5 * mv["log_variance"] + math.log(temp))
            x = x_next
            states.append(x)
        if with_log_prob:
            y, jac = self._final(x, z, z_uncond, s, chain)
            log_p = log_p - self._log_abs_det(jac)
        else:
            step = torch.zeros(n, dtype=torch.long, device=z.device)
            y = chain.p_sample(self._out(x, step, z, z_uncond, s, chain), x, step, None,
                               clip_denoised=head.clip_denoised)
        states.append(y)
        return torch.stack(states, 1).float(), log_p

    def states_log_prob(self, states: Tensor, z: Tensor, z_uncond: Tensor | None, params: SamplingParams) -> Tensor:
        """``log p(x_S, …, x_1)`` ``[N]`` of the stochastic states ``states: [N, S, D]`` (one batched network call)."""
        steps, temp = self.resolve(params)
        chain, s, n, d = self.head.chain(steps), params.guidance_scale, z.shape[0], states.shape[-1]
        log_p = normal_log_prob(states[:, 0], 0.0, 0.0)
        if steps > 1:  # steps S-1..1: inputs x_{j+1}, outputs x_j
            prev, nxt = states[:, :-1].reshape(-1, d), states[:, 1:].reshape(-1, d)
            step = torch.arange(steps - 1, 0, -1, device=z.device).repeat(n)
            zr = z.repeat_interleave(steps - 1, 0)
            zur = None if z_uncond is None else z_uncond.repeat_interleave(steps - 1, 0)
            mv = chain.p_mean_variance(self._out(prev, step, zr, zur, s, chain), prev, step, self.head.clip_denoised)
            lp = normal_log_prob(nxt, mv["mean"], 0.5 * mv["log_variance"] + math.log(temp))
            log_p = log_p + lp.view(n, steps - 1).sum(1)
        return log_p

class FlowLaw(TrajectoryLaw):
    """``V = (x_N, …, x_1, y)`` under :class:`FlowHead`'s ``"sde"`` sampler (Euler–Maruyama, module docstring)."""

    kind = "flow"

    def schedule(self, steps: int) -> list[float]:
        """The time grid of :meth:`FlowHead.sample`: ``N + 1`` floats from 1 to 0."""
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()

    # -- the head's arithmetic -------------------------------------------------------------------------------
    def _out(self, x: Tensor, t, z: Tensor, z_uncond: Tensor | None, s: float) -> Tensor:
        self.evals, self.calls = self.evals + x.shape[0], self.calls + 1
        return self.head.predict(x, t, z, z_uncond, s)

    def _final(self, x: Tensor, z: Tensor, z_uncond: Tensor | None, s: float, times) -> tuple[Tensor, Tensor]:
        """``f(x) = x − t_1·v(x, t_1)`` ``[N, D]`` (the last, deterministic step) and its Jacobian ``[N, D, D]``."""
        t1 = times[-2]
        return self._jacobian(lambda xg: xg + (0.0 - t1) * self._out(xg, t1, z, z_uncond, s), x)

    def _moments(self, x: Tensor, t: Tensor, t_next: Tensor, z, z_uncond, s) -> tuple[Tensor, Tensor]:
        """Mean ``[N, D]`` and std ``[N]`` (temperature 1) of the stochastic step ``t → t_next`` (both ``[N]``)."""
        return self.head.sde_moments(x, t, t_next, self._out(x, t, z, z_uncond, s))

    # -- the law ---------------------------------------------------------------------------------------------
    def sample(self, z, z_uncond, params, generator, with_log_prob=True):
        steps, temp = self.resolve(params)
        times, s, n, head = self.schedule(steps), params.guidance_scale, z.shape[0], self.head
        x = temp * head.randn((n, head.dim), generator, like=z)  # as FlowHead.sample: x_N ~ N(0, τ² I)
        states = [x]
        log_p = normal_log_prob(x, 0.0, math.log(temp)) if with_log_prob else None
        for t, t_next in zip(times[:-2], times[1:-1]):
            tt, tn = (torch.full((n,), u, dtype=x.dtype, device=x.device) for u in (t, t_next))
            mean, std = self._moments(x, tt, tn, z, z_uncond, s)
            x_next = mean + temp * std[:, None] * head.randn(tuple(x.shape), generator, like=x)
            if with_log_prob:
                log_p = log_p + normal_log_prob(x_next, mean, torch.log(temp * std)[:, None])
            x = x_next
            states.append(x)
        if with_log_prob:
            y, jac = self._final(x, z, z_uncond, s, times)
            log_p = log_p - self._log_abs_det(jac)
        else:
            y = x + (0.0 - times[-2]) * self._out(x, times[-2], z, z_uncond, s)
        states.append(y)
        return torch.stack(states, 1).float(), log_p

    def states_log_prob(self, states: Tensor, z: Tensor, z_uncond: Tensor | None, params: SamplingParams) -> Tensor:
        """``log p(x_N, …, x_1)`` ``[N]`` of the stochastic states ``states: [N, S, D]`` (one batched network call)."""
        steps, temp = self.resolve(params)
        times, s, n, d = self.schedule(steps), params.guidance_scale, z.shape[0], states.shape[-1]
        log_p = normal_log_prob(states[:, 0], 0.0, math.log(temp))
        if steps > 1:  # steps times[i] → times[i + 1], i < N − 1: inputs states[:, i], outputs states[:, i + 1]
            prev, nxt = states[:, :-1].reshape(-1, d), states[:, 1:].reshape(-1, d)
            grid = torch.tensor(times, dtype=states.dtype, device=states.device)
            t, t_next = grid[:steps - 1].repeat(n), grid[1:steps].repeat(n)
            zr = z.repeat_interleave(steps - 1, 0)
            zur = None if z_uncond is None else z_uncond.repeat_interleave(steps - 1, 0)
            mean, std = self._moments(prev, t, t_next, zr, zur, s)
            lp = normal_log_prob(nxt, mean, torch.log(temp * std)[:, None])
            log_p = log_p + lp.view(n, steps - 1).sum(1)
        return log_p


def law_for(head, what: str) -> TokenLaw:
    """The law of ``head`` (the ``what`` model's: "draft" / "target"), or a ``ValueError`` naming what is allowed."""
    if isinstance(head, GaussianHead):
        return GaussianLaw(head)
    if isinstance(head, DiffusionHead):
        if head.clip_denoised is not None:
            raise ValueError(f"ContinuousSD: the {what}'s diffusion head has clip_denoised={head.clip_denoised}; "
                             f"the clamp in the last denoising step is not injective, so the token has no density "
                             f"through it; use clip_denoised=None")
        return DiffusionLaw(head)
    if isinstance(head, FlowHead):
        if head.solver != "sde":
            raise ValueError(f"ContinuousSD: the {what}'s head is a FlowHead with solver={head.solver!r}; its solvers "
                             f"{ODE_SOLVERS} are deterministic ODE integrators, so neither the token nor the "
                             f"trajectory has a density to accept against; use solver='sde' (Euler–Maruyama, a "
                             f"stochastic trajectory with the same marginals)")
        return FlowLaw(head)
    raise ValueError(f"ContinuousSD: the {what}'s head {type(head).__name__} has no tractable density; ContinuousSD "
                     f"supports head='gaussian', head='diffusion' and head='flow' with solver='sde'")
