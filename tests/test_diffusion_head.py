"""Diffusion-loss head (MAR): checkpoint-fixture parity, exact sampling on a Gaussian oracle, diffusers parity,
a trained toy, guidance, the per-row path, errors, save/load."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from scipy import stats
from torch import nn

from tokenloom import heads
from tokenloom.config import SamplingParams
from tokenloom.heads.diffusion import DiffusionHead
from tokenloom.heads.mlp_denoiser import from_mar_state_dict
from tokenloom.heads.schedules import GaussianDiffusion
from tokenloom.tokens import Grid, Sequence, TokenSpec

MAR_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mar" / "mar"
D = 2
SPEC = TokenSpec(kind="continuous", dim=D, layout=Sequence(4))
MU = torch.tensor([1.5, -0.5])
SIGMA = torch.tensor([0.5, 0.1])
TRAIN_ALPHAS_CUMPROD = GaussianDiffusion.cosine(1000).alphas_cumprod


class GaussianEps(nn.Module):
    """Exact ``E[ε | x_t]`` for ``x ~ N(mu, sigma²)`` per channel (``c = [mu, log sigma]``), plus the variance value
    ``v`` that makes the step's variance the true one of ``p(x_{t-1} | x_t)`` on ``chain`` (or a constant ``v``).

    With both exact, every ancestral step samples the true reverse conditional, so the chain's output is
    distributed as N(mu, sigma²) for any number of steps (up to Var[x0 | x_0-step] ≈ 1e-4·sigma² at the end).
    """

    def __init__(self, chain: GaussianDiffusion | None = None, v: float | None = None):
        super().__init__()
        self.chain, self.v = chain, v

    def forward(self, x, t, c):
        mu, var = c[:, :D].double(), c[:, D:2 * D].double().exp() ** 2
        a = TRAIN_ALPHAS_CUMPROD[t.long()][:, None]
        eps = (1 - a).sqrt() * (x.double() - a.sqrt() * mu) / (a * var + 1 - a)
        if self.v is not None:
            return torch.cat([eps, torch.full_like(eps, self.v)], -1).to(x.dtype)
        ch = self.chain
        j = torch.searchsorted(ch.timestep_map, t.long())
        var_x0 = var * (1 - a) / (a * var + 1 - a)
        true_log_var = (ch.posterior_variance[j][:, None] + ch.posterior_mean_coef1[j][:, None] ** 2 * var_x0).log()
        low, high = ch.posterior_log_variance_clipped[j][:, None], ch.log_betas[j][:, None]
        frac = (true_log_var - low) / (high - low)
        return torch.cat([eps, 2 * frac - 1], -1).to(x.dtype)


def gaussian_z(n: int, mu=MU, sigma=SIGMA) -> torch.Tensor:
    return torch.cat([mu, sigma.log()]).expand(n, 2 * D).contiguous()


def oracle_head(steps: int, v: float | None = None) -> DiffusionHead:
    head = heads.build("diffusion", spec=SPEC, width=2 * D, depth=1, mlp_width=8, num_sampling_steps=steps)
    head.net = GaussianEps(head.chain(steps), v)
    return head


def tiny_head(seed: int = 0, **kw) -> DiffusionHead:
    torch.manual_seed(seed)
    head = heads.build("diffusion", spec=SPEC, width=6, depth=2, mlp_width=32, **kw)
    for p in head.parameters():  # MAR's init zeroes the output; give every layer an effect
        nn.init.normal_(p, std=0.1)
    return head.eval()


def assert_gaussian(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, what: str) -> None:
    """Mean within 4 standard errors, std within 4 standard errors (+0.5%), and a KS test per channel."""
    n = x.shape[0]
    mean, std = x.mean(0), x.std(0)
    assert ((mean - mu).abs() < 4 * sigma / math.sqrt(n)).all(), f"{what}: mean {mean} vs {mu}"
    assert ((std / sigma - 1).abs() < 4 / math.sqrt(2 * n) + 0.005).all(), f"{what}: std {std} vs {sigma}"
    for c in range(x.shape[1]):
        p = stats.kstest(((x[:, c] - mu[c]) / sigma[c]).double().numpy(), "norm").pvalue
        assert p > 1e-3, f"{what}: KS p-value {p:.2g} for channel {c}"


# -- MAR checkpoint parity ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mar():
    if not (MAR_FIXTURE / "io.safetensors").exists():
        pytest.skip(f"MAR fixtures not found at {MAR_FIXTURE}")
    from safetensors.torch import load_file

    io = load_file(str(MAR_FIXTURE / "io.safetensors"))
    state = torch.load(MAR_FIXTURE / "checkpoint-last.pth", weights_only=True, map_location="cpu")["model_ema"]
    spec = TokenSpec(kind="continuous", dim=8, layout=Grid(4, 4))
    head = heads.build("diffusion", spec=spec, width=64, depth=2, mlp_width=64)
    head.net.load_state_dict(from_mar_state_dict(state))  # strict: every key maps, every shape fits
    return head.eval(), io


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """The fixtures' acceptance rule: ``max|got − ref| <= 2e-5 · max(1, max|ref|)``."""
    return float((got.double() - ref.double()).abs().max()) <= 2e-5 * max(1.0, float(ref.abs().max()))


def test_mar_network_and_guidance_match_the_checkpoint_fixture(mar):
    head, io = mar
    x, t, c = io["diff_x_t"], io["diff_t"], io["diff_c"]
    with torch.no_grad():
        assert _close(head(x, t, c), io["diff_net_out"])
        # forward_with_cfg ran the net on [x[:3], x[:3]] with t and c as given (rows 3.. are the uncond half).
        cond, uncond = head(x[:3], t[:3], c[:3]), head(x[:3], t[3:], c[3:])
        ref = io["diff_net_out_cfg"]
        assert _close(uncond[:, :8] + 2.5 * (cond[:, :8] - uncond[:, :8]), ref[:3, :8])
        assert _close(cond[:, 8:], ref[:3, 8:])


def test_mar_schedules_match_the_checkpoint_fixture(mar):
    head, io = mar
    chain = head.chain(100)
    assert float((head.train_chain.betas - io["train_betas"]).abs().max()) <= 1e-12
    assert float((chain.betas - io["gen_betas"]).abs().max()) <= 1e-12
    assert torch.equal(chain.timestep_map, io["gen_timestep_map"])


def test_mar_reverse_step_and_losses_match_the_checkpoint_fixture(mar):
    head, io = mar
    x, step, c = io["diff_x_t"], io["diff_t_spaced"], io["diff_c"]
    chain = head.chain(100)
    with torch.no_grad():
        out = chain.p_mean_variance(head.predict(x, chain.model_timesteps(step), c), x, step)
        for ours, theirs in (("mean", "pmv_mean"), ("variance", "pmv_variance"),
                             ("log_variance", "pmv_log_variance"), ("pred_x0", "pmv_pred_xstart")):
            assert _close(out[ours], io[theirs]), ours
        losses = head.training_losses(c, io["diff_x_start"], io["diff_t"], io["diff_noise"])
    assert int(io["diff_t"].min()) == 0  # the decoder-NLL branch of vb is exercised
    for k in ("loss", "mse", "vb"):
        assert _close(losses[k], io[f"train_{k}"]), k


def test_mar_key_map_rejects_unknown_keys():
    sd = {"diffloss.net.input_proj.weight": torch.zeros(4, 2), "diffloss.net.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="diffloss.net.extra.weight"):
        from_mar_state_dict(sd)
    with pytest.raises(ValueError, match="no keys under prefix"):
        from_mar_state_dict({"other.weight": torch.zeros(1)})


# -- exact sampling on a Gaussian oracle ----------------------------------------------------------------------
@pytest.mark.parametrize("steps", [5, 25])
def test_sampler_is_exact_with_the_true_reverse_process(steps):
    n = 6000
    x = oracle_head(steps).sample(gaussian_z(n), SamplingParams(), torch.Generator().manual_seed(0))
    assert_gaussian(x, MU, SIGMA, f"{steps} steps")


def test_exactness_check_detects_a_wrong_variance():
    # Same chain with the posterior variance (v = −1) instead of the true one: 5 steps shrink the spread.
    x = oracle_head(5, v=-1.0).sample(gaussian_z(6000), SamplingParams(), torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        assert_gaussian(x, MU, SIGMA, "v = -1")


def test_matches_diffusers_ddpm_scheduler():
    head, n = oracle_head(50, v=0.3), 16
    z = gaussian_z(n)
    ours = head.sample(z, SamplingParams(), torch.Generator().manual_seed(3))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                          variance_type="learned_range", clip_sample=False)
    sched.set_timesteps(timesteps=head.chain().timestep_map.flip(0).tolist())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, D, generator=g)
    for t in sched.timesteps:
        x = sched.step(head.net(x, t.expand(n), z), t, x, generator=g).prev_sample
    assert torch.allclose(ours, x, atol=2e-4), float((ours - x).abs().max())  # float32 vs float64 tables


def test_noise_temperature_scales_the_step_noise():
    z, p = gaussian_z(4000), SamplingParams()
    head = oracle_head(10)
    draw = lambda **kw: head.sample(z, p, torch.Generator().manual_seed(1), **kw)  # noqa: E731
    assert torch.equal(draw(), draw(noise_temperature=1.0))
    stds = [float(draw(noise_temperature=tau).std(0)[0]) for tau in (0.0, 0.5, 1.0)]
    assert stds[0] < stds[1] < stds[2]
    assert stds[0] < 0.5 * stds[2]


# -- guidance ----------------------------------------------------------------------------------------------
def test_guidance_one_is_none_zero_is_uncond_and_s_shifts_the_mean_exactly():
    head, n = oracle_head(10), 6000
    mu_u = torch.tensor([-1.0, 2.0])
    z, zu = gaussian_z(n), gaussian_z(n, mu=mu_u)
    run = lambda zz, s, unc: head.sample(zz, SamplingParams(guidance_scale=s),  # noqa: E731
                                         torch.Generator().manual_seed(4), z_uncond=unc)
    assert torch.equal(run(z, 1.0, zu), run(z, 1.0, None))
    assert torch.allclose(run(z, 0.0, zu), run(zu, 1.0, None), atol=1e-6)
    # eps is affine in mu at fixed sigma, so guided eps is the exact eps of N(mu_u + s·(mu − mu_u), sigma²).
    assert_gaussian(run(z, 3.0, zu), mu_u + 3.0 * (MU - mu_u), SIGMA, "s = 3")


def test_predict_guides_eps_and_keeps_the_conditional_variance():
    head = tiny_head()
    g = torch.Generator().manual_seed(0)
    x, z, zu = torch.randn(5, D, generator=g), torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    t = torch.randint(0, 1000, (5,), generator=g)
    with torch.no_grad():
        cond, uncond = head(x, t, z), head(x, t, zu)
        got = head.predict(x, t, z, zu, 2.5)
    assert not torch.allclose(cond, uncond)
    assert torch.allclose(got[:, :D], uncond[:, :D] + 2.5 * (cond[:, :D] - uncond[:, :D]), atol=1e-5)
    assert torch.allclose(got[:, D:], cond[:, D:], atol=1e-6)


# -- training on a toy ---------------------------------------------------------------------------------------
def _toy_batch(n: int, g: torch.Generator):
    """Class 0: N((1, −1), 0.3²); class 1: (±1 + N(0, 0.15²), 0.5 + N(0, 0.1²)). ``z`` = one-hot class."""
    y = torch.randint(0, 2, (n,), generator=g)
    a = torch.stack([1 + 0.3 * torch.randn(n, generator=g), -1 + 0.3 * torch.randn(n, generator=g)], 1)
    sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    b = torch.stack([sign + 0.15 * torch.randn(n, generator=g), 0.5 + 0.1 * torch.randn(n, generator=g)], 1)
    return nn.functional.one_hot(y, 2).float(), torch.where(y[:, None] == 0, a, b)


def _train_toy(iters: int, lr: float) -> tuple[DiffusionHead, float, float, float]:
    torch.manual_seed(0)
    head = heads.build("diffusion", spec=SPEC, width=2, depth=2, mlp_width=64, diffusion_batch_mul=4,
                       clip_denoised=3.0)
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
    return head.eval(), sum(losses[:20]) / 20, sum(losses[-50:]) / 50, time.perf_counter() - start


def _check_toy_samples(x0: torch.Tensor, x1: torch.Tensor, what: str) -> None:
    frac_pos = float((x1[:, 0] > 0).float().mean())
    near = float(((x1[:, 0].abs() - 1).abs() < 0.3).float().mean())
    print(f"{what}: class0 mean {x0.mean(0).tolist()} std {x0.std(0).tolist()}; class1 P(x>0) {frac_pos:.3f} "
          f"P(||x|-1|<.3) {near:.3f} dim1 mean {x1[:, 1].mean():.3f} std {x1[:, 1].std():.3f}")
    assert torch.allclose(x0.mean(0), torch.tensor([1.0, -1.0]), atol=0.1)
    assert torch.allclose(x0.std(0), torch.tensor([0.3, 0.3]), rtol=0.3)
    assert 0.35 < frac_pos < 0.65 and near > 0.75
    assert abs(float(x1[:, 1].mean()) - 0.5) < 0.1 and float(x1[:, 1].std()) < 0.25


def _one_hot(n: int, c: int) -> torch.Tensor:
    return nn.functional.one_hot(torch.full((n,), c), 2).float()


def test_trained_toy_samples_match_the_data():
    """150 training steps, then ``sample`` end to end (50 steps) with ``clip_denoised=3``: without it, a briefly
    trained MLP's eps error at t = 999 (~0.05 here; the first respaced step multiplies it by ~600) throws the
    chain out of range — MAR's real models are trained ~10⁶ times longer and never clip."""
    head, first, last, train_s = _train_toy(150, 5e-3)
    p, n = SamplingParams(num_steps=50), 2000
    x0 = head.sample(_one_hot(n, 0), p, torch.Generator().manual_seed(1))
    x1 = head.sample(_one_hot(n, 1), p, torch.Generator().manual_seed(2))
    print(f"diffusion toy: train {train_s:.1f}s, loss {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first
    _check_toy_samples(x0, x1, "diffusion toy, sample()")


# -- the stateless path ----------------------------------------------------------------------------------------
def test_per_row_steps_equal_rowwise_calls():
    head = tiny_head()
    chain = head.chain(20)
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(4, D, generator=g), torch.randn(4, 6, generator=g)
    step = torch.tensor([19, 7, 1, 0])
    noise = torch.randn(4, D, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        out = chain.p_sample(head.predict(x, chain.model_timesteps(step), z), x, step, noise)
        rows = torch.cat([chain.p_sample(head.predict(x[i:i + 1], chain.model_timesteps(step[i:i + 1]), z[i:i + 1]),
                                         x[i:i + 1], step[i:i + 1], noise[i:i + 1]) for i in range(4)])
        batched = head.denoise_step(x, step, z, chain, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(out, rows, atol=1e-6)
    assert torch.allclose(out, batched, atol=1e-6)
    mean = chain.p_mean_variance(head.predict(x, chain.model_timesteps(step), z), x, step)["mean"]
    assert torch.allclose(out[3], mean[3]) and not torch.allclose(out[:3], mean[:3])  # step 0 adds no noise
    t = torch.tensor([0, 10, 500, 999])
    x0 = torch.randn(4, D, generator=g)
    with torch.no_grad():
        losses = head.training_losses(z, x0, t, noise)
        single = head.training_losses(z[2:3], x0[2:3], t[2:3], noise[2:3])
    assert torch.allclose(losses["loss"][2], single["loss"][0], atol=1e-6)


def test_same_seed_same_samples_and_loss():
    head, z = tiny_head(), torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    p = SamplingParams(num_steps=8)
    a = head.sample(z, p, torch.Generator().manual_seed(7))
    assert torch.equal(a, head.sample(z, p, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, head.sample(z, p, torch.Generator().manual_seed(8)))
    target = torch.randn(6, D)
    la = head.loss(z, target, generator=torch.Generator().manual_seed(3))
    assert la.shape == (6,)
    assert torch.equal(la, head.loss(z, target, generator=torch.Generator().manual_seed(3)))


# -- errors ----------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    with pytest.raises(ValueError, match=r"DiffusionHead models \('continuous',\).*kind='bits'"):
        heads.build("diffusion", spec=TokenSpec(kind="bits", bits=4, layout=Grid(2, 2)), width=8)
    with pytest.raises(ValueError, match="num_sampling_steps must be <= num_train_steps"):
        heads.build("diffusion", spec=SPEC, width=8, num_sampling_steps=2000)
    with pytest.raises(ValueError, match="diffusion_batch_mul"):
        heads.build("diffusion", spec=SPEC, width=8, diffusion_batch_mul=0)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip_denoised"):
            heads.build("diffusion", spec=SPEC, width=8, clip_denoised=bad)
    head = tiny_head()
    with pytest.raises(ValueError, match=r"z must have shape \[N, 6\]"):
        head.loss(torch.randn(3, 5), torch.randn(3, D))
    with pytest.raises(ValueError, match=r"target must have shape \[3, 2\]"):
        head.loss(torch.randn(3, 6), torch.randn(3, 4))
    with pytest.raises(TypeError, match="target must be a float tensor"):
        head.loss(torch.randn(3, 6), torch.ones(3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="needs z_uncond"):
        head.sample(torch.randn(3, 6), SamplingParams(guidance_scale=2.0))
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 1000\]"):
        head.chain(0)
    with pytest.raises(ValueError, match=r"step must lie in \[0, 20\)"):
        head.denoise_step(torch.randn(2, D), torch.tensor([20, 3]), torch.randn(2, 6), head.chain(20))
    with pytest.raises(ValueError, match="noise_temperature"):
        head.sample(torch.randn(3, 6), SamplingParams(num_steps=2), noise_temperature=-1.0)


# -- save / load / registry ---------------------------------------------------------------------------------
class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 6)
        self.head = heads.build("diffusion", spec=SPEC, width=6, depth=2, mlp_width=16)


def test_state_dict_round_trip_and_registry():
    assert {"diffusion", "flow"} <= set(heads.available())
    torch.manual_seed(0)
    a = Holder()
    for p in a.parameters():
        nn.init.normal_(p, std=0.1)
    b = Holder()
    b.load_state_dict(a.state_dict())  # strict
    assert all(k.startswith(("backbone.", "head.net.")) for k in a.state_dict())  # no schedule tables saved
    z = a.backbone(torch.randn(4, 3))
    p = SamplingParams(num_steps=6)
    with torch.no_grad():
        assert torch.equal(a.head.sample(z, p, torch.Generator().manual_seed(0)),
                           b.head.sample(z, p, torch.Generator().manual_seed(0)))
