"""MAR's Gaussian diffusion (IDDPM code): cosine betas, respacing, epsilon prediction, learned-range variance.

Stateless: every function takes a per-row step index ``step: [N]`` long, so each token may sit at its own
point of the chain (MAR trains with one random ``t`` per row; block diffusion and speculative decoding step
tokens that are at different noise levels).

Why not ``diffusers.DDPMScheduler``: its ``"squaredcos_cap_v2"`` betas with ``variance_type="learned_range"``,
``clip_sample=False`` and custom timesteps compute the same step (``tests/test_diffusion_head.py`` checks a
whole sampling loop against it), but it holds one scalar timestep per call, keeps its tables in float32 (MAR's
and the checkpoint fixtures' tables are float64, gathered then cast to float32), has no noise temperature
and no training loss (MAR trains with MSE + the variational bound that fits the learned variance).

Tables (float64, length S = number of steps of this chain):
``betas``, ``alphas_cumprod`` (a_t), ``alphas_cumprod_prev`` (a_{t-1}, 1 at t = 0),
``posterior_variance``, ``posterior_log_variance_clipped`` (t = 0 entry replaced by t = 1's),
``posterior_mean_coef1``/``2``. ``timestep_map[j]`` is the original (1000-step) timestep the network sees at
step ``j`` of a respaced chain.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

LOG2 = math.log(2.0)


def cosine_betas(num_train_steps: int, max_beta: float = 0.999) -> Tensor:
    """``[T]`` float64 cosine betas: ``beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta)``,
    ``abar(s) = cos²((s + 0.008) / 1.008 · π/2)``."""
    if isinstance(num_train_steps, bool) or not isinstance(num_train_steps, int) or num_train_steps < 1:
        raise ValueError(f"num_train_steps must be a positive int, got {num_train_steps!r}")

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    t = num_train_steps
    return torch.tensor(
        [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)], dtype=torch.float64
    )


def respaced_timesteps(num_train_steps: int, num_steps: int) -> list[int]:
    """IDDPM's ``space_timesteps(T, str(N))``: ``round(k · (T-1)/(N-1))`` accumulated by float addition, k < N.

    Python's ``round`` (half to even) and the running sum reproduce MAR's kept timesteps exactly.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be an int in [1, {num_train_steps}], got {num_steps!r}")
    stride = 1.0 if num_steps <= 1 else (num_train_steps - 1) / (num_steps - 1)
    kept, cur = set(), 0.0
    for _ in range(num_steps):
        kept.add(round(cur))
        cur += stride
    return sorted(kept)


class GaussianDiffusion:
    """One diffusion chain (a base schedule or a respaced one) with MAR's parameterisation.

    The network output ``model_out: [N, 2D]`` holds the noise prediction ``eps = model_out[:, :D]`` and the
    variance interpolation value ``v = model_out[:, D:]`` (log variance = ``(v+1)/2 · log beta_t +
    (1 - (v+1)/2) · posterior_log_variance_clipped_t``).
    """

    def __init__(self, betas: Tensor, timestep_map: Tensor):
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError(f"betas must be a 1D tensor with values in (0, 1], got shape {tuple(betas.shape)}")
        self.betas = betas
        self.timestep_map = timestep_map.to(torch.long)
        self.num_steps = len(betas)
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]) if self.num_steps > 1 \
            else self.posterior_variance
        self.posterior_log_variance_clipped = clipped.log()
        self.log_betas = betas.log()
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    @classmethod
    def cosine(cls, num_train_steps: int = 1000, num_steps: int | None = None) -> GaussianDiffusion:
        """MAR's chain: the cosine base schedule, respaced to ``num_steps`` (None = all ``num_train_steps``)."""
        return _cosine_chain(num_train_steps, num_train_steps if num_steps is None else num_steps)

    # -- gathering ---------------------------------------------------------------------------------------
    def check_step(self, step: Tensor, name: str = "step") -> None:
        if not isinstance(step, Tensor) or step.dtype != torch.long or step.dim() != 1:
            got = f"{step.dtype} tensor of shape {tuple(step.shape)}" if isinstance(step, Tensor) else type(step)
            raise TypeError(f"{name} must be a 1D long tensor [N] of step indices, got {got}")
        if step.numel() and (int(step.min()) < 0 or int(step.max()) >= self.num_steps):
            raise ValueError(f"{name} must lie in [0, {self.num_steps}), got min {int(step.min())}, "
                             f"max {int(step.max())}")

    def _at(self, table: Tensor, step: Tensor, like: Tensor) -> Tensor:
        """``table[step]`` gathered in float64, then cast to ``like``'s dtype, shaped ``[N, 1]``."""
        return table.to(step.device)[step].to(like.dtype)[:, None]

    def model_timesteps(self, step: Tensor) -> Tensor:
        """``[N]`` long: the original timestep the network is called with at each row's step."""
        return self.timestep_map.to(step.device)[step]

    # -- forward process ---------------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, step: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; all ``[N, D]``."""
        return self._at(self.sqrt_alphas_cumprod, step, x0) * x0 + \
            self._at(self.sqrt_one_minus_alphas_cumprod, step, x0) * noise

    def q_posterior(self, x0: Tensor, x_t: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        """Mean ``[N, D]`` and clipped log variance ``[N, 1]`` of ``q(x_{t-1} | x_t, x0)``."""
        coef1 = self._at(self.posterior_mean_coef1, step, x_t)
        mean = coef1 * x0 + self._at(self.posterior_mean_coef2, step, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, step, x_t)

    # -- reverse process ---------------------------------------------------------------------------------
    def p_mean_variance(self, model_out: Tensor, x_t: Tensor, step: Tensor,
                        clip_denoised: float | None = None) -> dict[str, Tensor]:
        """IDDPM's ``p_mean_variance`` (learned range, epsilon prediction): mean, variance, log_variance,
        pred_x0, all ``[N, D]``. ``clip_denoised``: clamp pred_x0 to ``[-c, c]`` (MAR: None, no clipping)."""
        d = x_t.shape[-1]
        eps, v = model_out[:, :d], model_out[:, d:]
        min_log = self._at(self.posterior_log_variance_clipped, step, x_t)
        max_log = self._at(self.log_betas, step, x_t)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at(self.sqrt_recip_alphas_cumprod, step, x_t) * x_t - \
            self._at(self.sqrt_recipm1_alphas_cumprod, step, x_t) * eps
        if clip_denoised is not None:
            pred_x0 = pred_x0.clamp(-clip_denoised, clip_denoised)
        mean, _ = self.q_posterior(pred_x0, x_t, step)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance, "pred_x0": pred_x0}

    def p_sample(self, model_out: Tensor, x_t: Tensor, step: Tensor, noise: Tensor | None,
                 noise_temperature: float = 1.0, clip_denoised: float | None = None) -> Tensor:
        """``x_{t-1} = mean + [step != 0] · exp(log_var / 2) · noise · noise_temperature`` (MAR's temperature).

        ``noise`` may be None when every row is at step 0 (the last step adds no noise).
        """
        out = self.p_mean_variance(model_out, x_t, step, clip_denoised)
        if noise is None:
            if bool((step != 0).any()):
                raise ValueError("noise may only be None when every row is at step 0")
            return out["mean"]
        nonzero = (step != 0).to(x_t.dtype)[:, None]
        return out["mean"] + nonzero * (0.5 * out["log_variance"]).exp() * noise * noise_temperature

    # -- training ----------------------------------------------------------------------------------------
    def training_losses(self, model_out: Tensor, x0: Tensor, x_t: Tensor, step: Tensor,
                        noise: Tensor) -> dict[str, Tensor]:
        """MAR's loss per row ``[N]``: ``mse`` (eps) + ``vb`` (bits; KL for step > 0, decoder NLL at step 0).

        The vb term sees the eps half detached, so it only trains the variance channels (IDDPM's hybrid loss).
        """
        d = x0.shape[-1]
        mse = (noise - model_out[:, :d]).pow(2).mean(dim=-1)
        frozen = torch.cat([model_out[:, :d].detach(), model_out[:, d:]], dim=-1)
        out = self.p_mean_variance(frozen, x_t, step)
        true_mean, true_log_var = self.q_posterior(x0, x_t, step)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=-1) / LOG2
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"]).mean(dim=-1) / LOG2
        vb = torch.where(step == 0, nll, kl)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


@functools.lru_cache(maxsize=16)
def _cosine_chain(num_train_steps: int, num_steps: int) -> GaussianDiffusion:
    base = cosine_betas(num_train_steps)
    kept = respaced_timesteps(num_train_steps, num_steps)
    alphas_cumprod = torch.cumprod(1.0 - base, 0)
    betas, last = [], 1.0
    for i in kept:
        betas.append(1.0 - float(alphas_cumprod[i]) / last)
        last = float(alphas_cumprod[i])
    return GaussianDiffusion(torch.tensor(betas, dtype=torch.float64), torch.tensor(kept, dtype=torch.long))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise (nats)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2).pow(2) * (-logvar2).exp())


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood (nats) of ``x`` in [-1, 1] under a Gaussian discretised to 256 bins (IDDPM's decoder)."""
    centered = x - means
    inv_stdv = (-log_scales).exp()
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()
    log_cdf_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
