"""Flow-matching head: exact ODE maps on a Gaussian oracle, diffusers parity, a trained toy, guidance, errors."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler
from torch import nn

from tokenloom import heads
from tokenloom.config import SamplingParams
from tokenloom.heads.flow import FlowHead
from tokenloom.tokens import Grid, Sequence, TokenSpec

D = 2
SPEC = TokenSpec(kind="continuous", dim=D, layout=Sequence(4))
MU = torch.tensor([1.5, -0.5])
SIGMA = torch.tensor([0.5, 0.1])


class GaussianVelocity(nn.Module):
    """The exact velocity ``E[ε − x | x_t]`` for ``x ~ N(mu, sigma²)`` per channel, read from
    ``c = [mu, log sigma]``; called as the head's MLP (so it receives ``1000·t``)."""

    def forward(self, x, t_model, c):
        t = (t_model / 1000.0)[:, None].double()
        mu, var = c[:, :D].double(), c[:, D:2 * D].double().exp() ** 2
        m, s = (1 - t) * mu, (1 - t) ** 2 * var + t**2
        e_x0 = mu + (1 - t) * var / s * (x.double() - m)
        e_eps = t / s * (x.double() - m)
        return (e_eps - e_x0).to(x.dtype)


def gaussian_z(n: int, mu=MU, sigma=SIGMA) -> torch.Tensor:
    return torch.cat([mu, sigma.log()]).expand(n, 2 * D).contiguous()


def oracle_head(**kw) -> FlowHead:
    head = heads.build("flow", spec=SPEC, width=2 * D, depth=1, mlp_width=8, **kw)
    head.net = GaussianVelocity()
    return head


def tiny_head(seed: int = 0, **kw) -> FlowHead:
    torch.manual_seed(seed)
    head = heads.build("flow", spec=SPEC, width=6, depth=2, mlp_width=32, **kw)
    for p in head.parameters():  # MAR's init zeroes the output; give every layer an effect
        nn.init.normal_(p, std=0.2)
    return head.eval()


# -- exactness of the solvers ------------------------------------------------------------------------------
def _flow_map_error(solver: str, steps: int, temperature: float) -> float:
    """Max |sample − (mu + sigma·temperature·ε)|: the exact flow map of N(0, temperature²) to the target."""
    head, n = oracle_head(), 64
    x = head.sample(gaussian_z(n), SamplingParams(num_steps=steps), torch.Generator().manual_seed(1),
                    solver=solver, noise_temperature=temperature)
    eps = torch.randn(n, D, generator=torch.Generator().manual_seed(1))
    return float((x - (MU + SIGMA * temperature * eps)).abs().max())


def test_solvers_converge_to_the_exact_flow_map():
    euler = [_flow_map_error("euler", n, 1.0) for n in (10, 20, 40)]
    heun = [_flow_map_error("heun", n, 1.0) for n in (10, 20, 40)]
    print(f"flow-map max error euler {euler} heun {heun} (10/20/40 steps)")
    assert euler[2] < 0.08 and heun[2] < 8e-3
    assert euler[1] < 0.6 * euler[0] and euler[2] < 0.6 * euler[1]  # first order
    assert all(h < e for h, e in zip(heun, euler))
    assert heun[2] < 0.4 * heun[1]  # faster than first order


def test_noise_temperature_scales_the_initial_noise():
    # The Gaussian flow map is affine, so temperature τ gives exactly mu + sigma·τ·ε.
    assert _flow_map_error("heun", 40, 0.5) < 8e-3
    assert _flow_map_error("heun", 40, 0.0) < 8e-3  # τ = 0: the mode


@torch.no_grad()
def test_sde_solver_samples_the_flow_law():
    """Euler–Maruyama ("sde") on the exact velocity of N(mu, sigma²): its samples follow the data law (one-sample KS)
    and the ODE sampler's law (two-sample KS against "heun"), 20,000 samples, p > 0.001; first-order bias at 200 steps
    is below what KS detects (at 20 steps the sigma = 0.1 channel fails, so the test has power)."""
    from scipy.stats import ks_2samp, kstest, norm

    head, n, p = oracle_head(solver="sde"), 20_000, SamplingParams(num_steps=200)
    x = head.sample(gaussian_z(n), p, torch.Generator().manual_seed(0))
    ode = head.sample(gaussian_z(n), p, torch.Generator().manual_seed(1), solver="heun")
    for c in range(D):
        assert kstest(x[:, c].numpy(), norm(float(MU[c]), float(SIGMA[c])).cdf).pvalue > 1e-3, c
        assert ks_2samp(x[:, c].numpy(), ode[:, c].numpy()).pvalue > 1e-3, c
    # stochastic: the same initial noise gives different tokens than the ODE's deterministic map
    assert (x - head.sample(gaussian_z(n), p, torch.Generator().manual_seed(0), solver="euler")).abs().mean() > 0.01


def test_sde_steps_are_gaussian_and_the_last_is_the_euler_step():
    head, g = tiny_head(solver="sde"), torch.Generator().manual_seed(0)
    x, z = torch.randn(4, D, generator=g), torch.randn(4, 6, generator=g)
    t, t_next = torch.tensor([1.0, 0.7, 0.3, 0.1]), torch.tensor([0.8, 0.5, 0.0, 0.05])
    with torch.no_grad():
        v = head.predict(x, t, z)
        step = head.denoise_step(x, t, t_next, z, generator=torch.Generator().manual_seed(5), noise_temperature=0.5)
        noise = torch.randn(4, D, generator=torch.Generator().manual_seed(5))
        score = -(x + (1 - t[:, None]) * v) / t[:, None]
        want = x + (t_next - t)[:, None] * (v - 0.5 * t[:, None] * score) \
            + 0.5 * (t * (t - t_next)).sqrt()[:, None] * noise
        want[2] = x[2] - 0.3 * v[2]  # t_next = 0: deterministic Euler ODE step
        assert torch.allclose(step, want, atol=1e-5)
        # one step from t = 1 is the last step: no noise, equal to Euler
        z1 = z[:2]
        one = SamplingParams(num_steps=1)
        assert torch.equal(head.sample(z1, one, torch.Generator().manual_seed(1)),
                           head.sample(z1, one, torch.Generator().manual_seed(1), solver="euler"))
    with pytest.raises(ValueError, match="t_next must be <= t"):
        head.denoise_step(x, 0.2, 0.5, z)


def test_matches_diffusers_flow_match_schedulers():
    head, n = oracle_head(), 16
    z = gaussian_z(n)
    for solver, sched in (("euler", FlowMatchEulerDiscreteScheduler()), ("heun", FlowMatchHeunDiscreteScheduler())):
        sched.set_timesteps(12)
        sigmas = sched.sigmas.tolist()
        knots = [sigmas[0]] + sigmas[1::2] if solver == "heun" else sigmas  # heun repeats inner sigmas
        x = y = torch.randn(n, D, generator=torch.Generator().manual_seed(0))
        for t, t_next in zip(knots[:-1], knots[1:]):
            x = head.denoise_step(x, t, t_next, z, solver=solver)
        for t in sched.timesteps:
            y = sched.step(head.net(y, t.expand(n), z), t, y).prev_sample
        assert torch.allclose(x, y, atol=1e-5), f"{solver}: max diff {(x - y).abs().max()}"


# -- training on a toy ---------------------------------------------------------------------------------------
def _toy_batch(n: int, g: torch.Generator):
    """Class 0: N((1, −1), 0.3²); class 1: (±1 + N(0, 0.15²), 0.5 + N(0, 0.1²)). ``z`` = one-hot class."""
    y = torch.randint(0, 2, (n,), generator=g)
    a = torch.stack([1 + 0.3 * torch.randn(n, generator=g), -1 + 0.3 * torch.randn(n, generator=g)], 1)
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    b = torch.stack([sign + 0.15 * torch.randn(n, generator=g), 0.5 + 0.1 * torch.randn(n, generator=g)], 1)
    return nn.functional.one_hot(y, 2).float(), torch.where(y[:, None] == 0, a, b)


def test_trained_toy_samples_match_the_data():
    torch.manual_seed(0)
    head = heads.build("flow", spec=SPEC, width=2, depth=2, mlp_width=64, diffusion_batch_mul=4)
    iters, lr = 150, 5e-3
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iters, pct_start=0.1)
    g, losses, start = torch.Generator().manual_seed(0), [], time.perf_counter()
    for _ in range(iters):
        z, x = _toy_batch(256, g)
        loss = head.loss(z, x, generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - start
    first, last = sum(losses[:20]) / 20, sum(losses[-50:]) / 50
    head.eval()
    n = 2000
    x0 = head.sample(nn.functional.one_hot(torch.zeros(n, dtype=torch.long), 2).float(),
                     SamplingParams(num_steps=20), torch.Generator().manual_seed(1), solver="heun")
    x1 = head.sample(nn.functional.one_hot(torch.ones(n, dtype=torch.long), 2).float(),
                     SamplingParams(num_steps=20), torch.Generator().manual_seed(1), solver="heun")
    frac_pos = float((x1[:, 0] > 0).float().mean())
    near = float(((x1[:, 0].abs() - 1).abs() < 0.3).float().mean())
    print(f"flow toy: train {train_s:.1f}s ({iters} steps) loss {first:.3f} -> {last:.3f}; "
          f"class0 mean {x0.mean(0).tolist()} std {x0.std(0).tolist()}; "
          f"class1 P(x>0) {frac_pos:.3f}, P(||x|-1|<.3) {near:.3f}, "
          f"dim1 mean {x1[:, 1].mean():.3f} std {x1[:, 1].std():.3f}")
    assert last < 0.5 * first
    assert torch.allclose(x0.mean(0), torch.tensor([1.0, -1.0]), atol=0.1)
    assert torch.allclose(x0.std(0), torch.tensor([0.3, 0.3]), rtol=0.25)
    assert 0.4 < frac_pos < 0.6 and near > 0.8  # both modes, balanced, little mass between them
    assert abs(float(x1[:, 1].mean()) - 0.5) < 0.1 and float(x1[:, 1].std()) < 0.2


# -- guidance ------------------------------------------------------------------------------------------------
def test_guidance_scale_one_is_no_guidance_and_zero_is_unconditional():
    head, n = oracle_head(), 32
    mu_u = torch.tensor([-1.0, 2.0])
    z, zu = gaussian_z(n), gaussian_z(n, mu=mu_u)
    run = lambda zz, s, unc: head.sample(zz, SamplingParams(num_steps=40, guidance_scale=s),  # noqa: E731
                                         torch.Generator().manual_seed(4), z_uncond=unc, solver="heun")
    assert torch.equal(run(z, 1.0, zu), run(z, 1.0, None))
    assert torch.allclose(run(z, 0.0, zu), run(zu, 1.0, None), atol=1e-6)
    # Same sigma, so the velocity is affine in mu: guidance at s samples N(mu_u + s·(mu − mu_u), sigma²) exactly.
    eps = torch.randn(n, D, generator=torch.Generator().manual_seed(4))
    for s in (0.5, 3.0):
        want = mu_u + s * (MU - mu_u) + SIGMA * eps
        assert (run(z, s, zu) - want).abs().max() < 8e-3


def test_predict_combines_cond_and_uncond_velocities():
    head = tiny_head()
    g = torch.Generator().manual_seed(0)
    x, z, zu = torch.randn(5, D, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    t = torch.rand(5, generator=g)
    with torch.no_grad():
        want = head(x, t, zu) + 2.5 * (head(x, t, z) - head(x, t, zu))
        assert torch.allclose(head.predict(x, t, z, zu, 2.5), want, atol=1e-5)
        assert not torch.allclose(head(x, t, z), head(x, t, zu))


# -- the stateless path ----------------------------------------------------------------------------------------
def test_per_row_times_equal_rowwise_calls():
    head = tiny_head()
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(4, D, generator=g), torch.randn(4, 6, generator=g)
    t, t_next = torch.tensor([1.0, 0.7, 0.3, 0.1]), torch.tensor([0.8, 0.5, 0.0, 0.05])
    with torch.no_grad():
        batched = head.denoise_step(x, t, t_next, z, solver="heun")
        rows = torch.cat([head.denoise_step(x[i:i + 1], float(t[i]), float(t_next[i]), z[i:i + 1], solver="heun")
                          for i in range(4)])
        euler_row2 = head.denoise_step(x[2:3], 0.3, 0.0, z[2:3], solver="euler")
    assert torch.allclose(batched, rows, atol=1e-6)
    assert torch.allclose(batched[2:3], euler_row2, atol=1e-6)  # heun's last step (t_next = 0) is Euler
    x0, noise = torch.randn(4, D, generator=g), torch.randn(4, D, generator=g)
    losses = head.training_losses(z, x0, t, noise)["loss"]
    assert torch.allclose(losses[1], ((head(head.add_noise(x0[1:2], 0.7, noise[1:2]), t[1:2], z[1:2])
                                       - (noise[1:2] - x0[1:2])) ** 2).mean(), atol=1e-6)


def test_same_seed_same_samples_and_loss():
    head, z = tiny_head(), torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(num_steps=5)
    a = head.sample(z, p, torch.Generator().manual_seed(7))
    assert torch.equal(a, head.sample(z, p, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, head.sample(z, p, torch.Generator().manual_seed(8)))
    target = torch.randn(6, D)
    assert torch.equal(head.loss(z, target, generator=torch.Generator().manual_seed(3)),
                       head.loss(z, target, generator=torch.Generator().manual_seed(3)))


# -- errors ----------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"continuous.*kind='index'"):
        heads.build("flow", spec=TokenSpec(kind="index", vocab_size=16, layout=Grid(2, 2)), width=8)
    with pytest.raises(ValueError, match="solver"):
        heads.build("flow", spec=SPEC, width=8, solver="rk4")
    with pytest.raises(ValueError, match="num_sampling_steps"):
        heads.build("flow", spec=SPEC, width=8, num_sampling_steps=0)
    head = tiny_head()
    with pytest.raises(ValueError, match=r"z must have shape \[N, 6\]"):
        head.loss(torch.randn(3, 5), torch.randn(3, D))
    with pytest.raises(ValueError, match=r"target must have shape \[3, 2\]"):
        head.loss(torch.randn(3, 6), torch.randn(3, 3))
    with pytest.raises(ValueError, match="needs z_uncond"):
        head.sample(torch.randn(3, 6), SamplingParams(guidance_scale=2.0))
    with pytest.raises(ValueError, match="z_uncond must have the shape"):
        head.sample(torch.randn(3, 6), SamplingParams(guidance_scale=2.0), z_uncond=torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        head.predict(torch.randn(3, D), 1.5, torch.randn(3, 6))
    with pytest.raises(TypeError, match="params must be a SamplingParams"):
        head.sample(torch.randn(3, 6), {"num_steps": 3})


# -- save / load ---------------------------------------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 6)
        self.head = heads.build("flow", spec=SPEC, width=6, depth=2, mlp_width=16)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = Holder()
    for p in a.parameters():
        nn.init.normal_(p, std=0.2)
    b = Holder()
    b.load_state_dict(a.state_dict())  # strict
    assert all(k.startswith(("backbone.", "head.net.")) for k in a.state_dict())
    z = a.backbone(torch.randn(4, 3))
    p = SamplingParams(num_steps=4)
    with torch.no_grad():
        assert torch.equal(a.head.sample(z, p, torch.Generator().manual_seed(0)),
                           b.head.sample(z, p, torch.Generator().manual_seed(0)))
