"""Continuous speculative decoding (``ContinuousSD``), the ``"gaussian"`` head and diffusion trajectories.

Exactness: on RasterAR models with GaussianHead the output law must be the target's — one-sample KS against the known
Gaussian (context-free toy, first position of a context-dependent model) and two-sample KS against sequential
decoding, >= 20,000 samples, p > 0.001; the acceptance rate must be ``1 − TV(p_t, p_d)`` within binomial noise.
With diffusion heads (4 DDPM steps, briefly trained tiny heads whose draft learnt shifted data) the output must match
the target's own sampler (two-sample KS per position, channel and on projections), and two biased variants — accept
everything, or accept the trajectory without the change of variables of the last step (the draft's final function)
— must fail the same tests. Flow heads with ``solver="sde"`` (Euler–Maruyama, 4 steps, a velocity close to the exact
one of Gaussian data) likewise match the target's own sampler, and an identical draft accepts everything.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp, kstest, norm
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.decoding import ContinuousSD
from tokenloom.generators.decoding.trajectory import DiffusionLaw, FlowLaw
from tokenloom.generators.raster_ar import RasterAR
from tokenloom.heads.gaussian import GaussianHead
from tokenloom.tokens import Sequence, Tokens, TokenSpec

N = 20_000
ALPHA = 1e-3


def spec(length: int = 4, dim: int = 1) -> TokenSpec:
    return TokenSpec(kind="continuous", dim=dim, layout=Sequence(length))


def model(length=4, dim=1, head="gaussian", condition="none", seed=0, scale=0.0, **head_options) -> RasterAR:
    """Tiny RasterAR; ``scale > 0`` re-draws every weight ``N(0, scale²)`` so that tokens depend on the context."""
    torch.manual_seed(seed)
    kw = {"num_classes": 3} if condition == "class" else {}
    if head == "gaussian":
        head_options = {"mlp_width": 0, **head_options}
    m = RasterAR(token_spec=spec(length, dim).to_dict(), width=16, depth=1, num_heads=2, multiple_of=16,
                 condition=condition, head=head, head_options=head_options, **kw)
    if scale:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m.eval()


def constant(mu: float, sigma: float, length: int = 5, seed: int = 0) -> RasterAR:
    """Every token ``N(mu, sigma²)`` independently of the context (head weight 0, bias = (mu, log sigma²))."""
    m = model(length=length, seed=seed)
    with torch.no_grad():
        m.output_head.proj.weight.zero_()
        m.output_head.proj.bias.copy_(torch.tensor([mu, 2 * math.log(sigma)]))
    return m


def tv_gauss(mu1, s1, mu2, s2) -> float:
    x = torch.linspace(-30, 30, 600_001, dtype=torch.float64)
    p = torch.distributions.Normal(mu1, s1).log_prob(x).exp()
    q = torch.distributions.Normal(mu2, s2).log_prob(x).exp()
    return float(0.5 * (p - q).abs().sum() * (x[1] - x[0]))


# ------------------------------------------------------------------ GaussianHead
@torch.no_grad()
def test_gaussian_head_log_prob_and_sampling_law():
    head = GaussianHead(spec(dim=2), width=8, mlp_width=16)
    z, zu = torch.randn(5, 8), torch.randn(5, 8)
    params = SamplingParams(temperature=0.7, guidance_scale=2.0)
    mean_c, log_var = head.moments(z)
    mean_u, _ = head.moments(zu)
    mean, std = mean_u + 2.0 * (mean_c - mean_u), (0.5 * log_var).exp() * 0.7
    x = torch.randn(5, 2)
    want = torch.distributions.Normal(mean, std).log_prob(x).sum(-1)
    torch.testing.assert_close(head.log_prob(x, z, params, zu), want)
    torch.testing.assert_close(head.loss(z, x), -torch.distributions.Normal(mean_c, (0.5 * log_var).exp())
                               .log_prob(x).sum(-1))
    one = z[:1].expand(N, -1)
    draws = head.sample(one, params, torch.Generator().manual_seed(0), z_uncond=zu[:1].expand(N, -1))
    for c in range(2):
        assert kstest(draws[:, c].numpy(), norm(float(mean[0, c]), float(std[0, c])).cdf).pvalue > ALPHA
    with pytest.raises(ValueError, match="guidance_scale=2.0 needs z_uncond"):
        head.sample(z, params)
    with pytest.raises(ValueError, match="temperature > 0"):
        head.log_prob(x, z, SamplingParams(temperature=0.0))


def test_gaussian_head_trains_by_nll():
    torch.manual_seed(0)
    head = GaussianHead(spec(), width=4, mlp_width=8)
    z = torch.randn(256, 4)
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    for _ in range(300):
        x = 2.0 + 0.5 * torch.randn(256, 1)
        loss = head.loss(z, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mean, log_var = (t.detach() for t in head.moments(z))
    assert abs(float(mean.mean()) - 2.0) < 0.1
    assert abs(float((0.5 * log_var).exp().mean()) - 0.5) < 0.1


def test_raster_ar_with_gaussian_head_trains_and_generates():
    m = model(length=3).train()
    tokens = torch.randn(4, 3, 1)
    out = m(Tokens(tokens, m.spec), Condition(batch=4))
    assert out["loss"].isfinite() and "logits" not in out
    gen = m.generate(Condition(batch=2), generator=torch.Generator().manual_seed(0))
    assert gen.data.shape == (2, 3, 1) and gen.data.dtype == torch.float32


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("gamma", [1, 2, 3, 4])
def test_constant_gaussians_law_and_acceptance_rate(gamma):
    target, draft = constant(0.0, 1.0, seed=0), constant(0.8, 1.3, seed=1)
    dec = ContinuousSD(draft=draft, gamma=gamma)
    out = target.generate(Condition(batch=N), generator=torch.Generator().manual_seed(gamma), decoding=dec)
    x = out.data[..., 0].double()
    for pos in range(x.shape[1]):
        assert kstest(x[:, pos].numpy(), "norm").pvalue > ALPHA, pos
    # independent positions (the target's joint is a product): correlation of neighbours ~ 0
    corr = torch.corrcoef(x.T)
    assert float((corr - torch.eye(x.shape[1], dtype=corr.dtype)).abs().max()) < 4.5 / math.sqrt(N)
    s = dec.last_stats
    rate, want, n = s["acceptance_rate"], 1.0 - tv_gauss(0.0, 1.0, 0.8, 1.3), s["proposed"]
    assert n > N
    assert abs(rate - want) < 4.5 * math.sqrt(want * (1 - want) / n), (rate, want)
    assert s["tokens"] == 5 and s["forward_passes"] >= 1 + math.ceil(4 / (gamma + 1))


@pytest.mark.parametrize("gamma", [1, 2, 3, 4])
def test_context_model_matches_sequential_decoding(gamma):
    target, draft = model(seed=0, scale=0.5), model(seed=1, scale=0.5)
    dec = ContinuousSD(draft=draft, gamma=gamma)
    sd = target.generate(Condition(batch=N), generator=torch.Generator().manual_seed(10 + gamma),
                         decoding=dec).data[..., 0]
    seq = target.generate(Condition(batch=N), generator=torch.Generator().manual_seed(50 + gamma)).data[..., 0]
    # position 0: known Gaussian from the target's prefill
    with torch.no_grad():
        z0 = target.prefill(target.embed_prefix(Condition(batch=1)), target.new_cache(1))
        mean, std = target.output_head.distribution(z0, SamplingParams())
    assert kstest(sd[:, 0].numpy(), norm(float(mean), float(std)).cdf).pvalue > ALPHA
    # the joint through marginals and context-dependent statistics, against sequential decoding
    stats = [sd[:, i] for i in range(4)] + [sd[:, 1] - sd[:, 0], sd[:, 3] * sd[:, 2]]
    ref = [seq[:, i] for i in range(4)] + [seq[:, 1] - seq[:, 0], seq[:, 3] * seq[:, 2]]
    for i, (a, b) in enumerate(zip(stats, ref)):
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > ALPHA, i
    # the toy really has context dependence, and the draft really differs from the target
    assert abs(float(torch.corrcoef(seq[:, :2].T)[0, 1])) > 0.1
    assert 0.05 < dec.last_stats["acceptance_rate"] < 0.95


def test_guidance_and_temperature_match_sequential_decoding():
    target = model(condition="class", seed=0, scale=0.5)
    draft = model(condition="class", seed=1, scale=0.5)
    params = SamplingParams(guidance_scale=2.0, temperature=0.8)
    labels = torch.arange(N) % 3
    sd = target.generate(labels, params, torch.Generator().manual_seed(1),
                         decoding=ContinuousSD(draft=draft, gamma=3)).data[..., 0]
    seq = target.generate(labels, params, torch.Generator().manual_seed(2)).data[..., 0]
    for i in range(4):
        assert ks_2samp(sd[:, i].numpy(), seq[:, i].numpy()).pvalue > ALPHA, i
    assert ks_2samp((sd[:, 2] - sd[:, 1]).numpy(), (seq[:, 2] - seq[:, 1]).numpy()).pvalue > ALPHA


def test_identical_draft_accepts_everything_and_saves_passes():
    target = model(seed=0, scale=0.5)
    dec = ContinuousSD(draft=target, gamma=3)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    a = target.generate(Condition(batch=4), generator=gens, decoding=dec).data
    assert dec.last_stats["acceptance_rate"] == 1.0
    assert dec.last_stats["forward_passes"] == 2  # prefill + one pass over 3 drafts and the bonus position
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    b = target.generate(Condition(batch=4), generator=gens, decoding=dec).data
    torch.testing.assert_close(a, b)
    # every round accepts all drafts and takes the bonus token: the draft catches up on the bonus input
    long = model(length=9, seed=0, scale=0.5)
    dec = ContinuousSD(draft=long, gamma=2)
    long.generate(Condition(batch=3), generator=torch.Generator().manual_seed(0), decoding=dec)
    assert dec.last_stats["acceptance_rate"] == 1.0 and dec.last_stats["forward_passes"] == 1 + 3


# ------------------------------------------------------------------ bad input
def test_bad_input():
    target = model()
    for gamma in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="gamma must be an int >= 1"):
            ContinuousSD(draft=target, gamma=gamma)
    with pytest.raises(ValueError, match="share the TokenSpec"):
        target.generate(Condition(batch=2), decoding=ContinuousSD(draft=model(length=5)))
    with pytest.raises(ValueError, match="share the TokenSpec"):
        target.generate(Condition(batch=2), decoding=ContinuousSD(draft=model(dim=2)))
    with pytest.raises(ValueError, match="same condition"):
        target.generate(Condition(batch=2), decoding=ContinuousSD(draft=model(condition="class")))
    index = RasterAR(token_spec=TokenSpec(kind="index", vocab_size=8, layout=Sequence(4)).to_dict(), width=16,
                     depth=1, num_heads=2, multiple_of=16, condition="none")
    with pytest.raises(ValueError, match="draft must generate 'continuous' tokens"):
        ContinuousSD(draft=index)
    with pytest.raises(ValueError, match="target must generate 'continuous' tokens"):
        index.generate(Condition(batch=2), decoding=ContinuousSD(draft=target))
    diffusion = model(head="diffusion", depth=1, mlp_width=16, num_sampling_steps=4, num_train_steps=10)
    with pytest.raises(ValueError, match="same kind of variable, got draft GaussianHead and target DiffusionHead"):
        diffusion.generate(Condition(batch=2), decoding=ContinuousSD(draft=target))
    other_steps = model(head="diffusion", depth=1, mlp_width=16, num_sampling_steps=3, num_train_steps=10)
    with pytest.raises(ValueError, match="target's head takes 4 denoising steps and the draft's 3"):
        diffusion.generate(Condition(batch=2), decoding=ContinuousSD(draft=other_steps))
    diffusion.generate(Condition(batch=2), SamplingParams(num_steps=2), decoding=ContinuousSD(draft=other_steps))
    flow = model(head="flow", depth=1, mlp_width=16)
    with pytest.raises(ValueError, match=r"FlowHead with solver='euler'; its solvers \('euler', 'heun'\) are "
                                         r"deterministic"):
        ContinuousSD(draft=flow)
    with pytest.raises(ValueError, match="FlowHead with solver='euler'"):
        flow.generate(Condition(batch=2), decoding=ContinuousSD(draft=flow))
    with pytest.raises(ValueError, match=r"FlowHead with solver='heun'.*use solver='sde'"):
        ContinuousSD(draft=model(head="flow", depth=1, mlp_width=16, solver="heun"))
    clipped = model(head="diffusion", depth=1, mlp_width=16, clip_denoised=1.0)
    with pytest.raises(ValueError, match="clip_denoised=1.0; the clamp .* not injective"):
        ContinuousSD(draft=clipped)
    cold = model(head="diffusion", depth=1, mlp_width=16, num_sampling_steps=4, num_train_steps=10,
                 noise_temperature=0.0)
    with pytest.raises(ValueError, match="noise_temperature=0"):
        cold.generate(Condition(batch=2), decoding=ContinuousSD(draft=cold))
    with pytest.raises(ValueError, match="must be a RasterAR"):
        ContinuousSD(draft=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="list of 2"):
        target.generate(Condition(batch=2), generator=[torch.Generator()], decoding=ContinuousSD(draft=target))


def test_grid_layout_runs_through_generate():
    from tokenloom.tokens import Grid

    grid = TokenSpec(kind="continuous", dim=2, layout=Grid(2, 3)).to_dict()
    kw = dict(width=16, depth=1, num_heads=2, multiple_of=16, condition="class", num_classes=2, head="gaussian")
    torch.manual_seed(0)
    target, draft = RasterAR(token_spec=grid, **kw), RasterAR(token_spec=grid, **kw)
    dec = ContinuousSD(draft=draft, gamma=2)
    out = target.generate(torch.tensor([0, 1, 1]), SamplingParams(guidance_scale=1.5), decoding=dec)
    assert out.data.shape == (3, 6, 2) and out.data.isfinite().all()
    assert dec.last_stats["tokens"] == 6 and 2 <= dec.last_stats["forward_passes"] <= 6


# ------------------------------------------------------------------ diffusion heads
DIFFUSION = dict(depth=1, mlp_width=16, num_sampling_steps=4, num_train_steps=10)
N_DIFFUSION = 10_000  # the biased variants fail at p < 1e-25 with 4,000 samples


class GaussianDataDenoiser(torch.nn.Module):
    """A denoiser close to the optimal one for data ``x0 ~ N(mu(z), s²)``, ``mu(z) = shift + tanh(z W)/2``.

    ``eps = sqrt(1 − ā)(x − sqrt(ā) mu) / (ā s² + 1 − ā) + 0.3 sqrt(ā) tanh(2x)`` (the last term makes the last step
    nonlinear), variance value ``v = tanh(sum x)/2``. Stands in for a trained head: an untrained or briefly trained
    MLP errs at the top step, where the cosine chain multiplies eps errors by ~90, and its samples blow up.
    """

    def __init__(self, head, dim: int, shift: float, s: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(head.width, dim, generator=g) / math.sqrt(head.width))
        self.register_buffer("abar", head.train_chain.alphas_cumprod.float())
        self.shift, self.s = shift, s

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        a = self.abar[t.long()][:, None]
        mu = self.shift + 0.5 * torch.tanh(z.float() @ self.w)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * self.s ** 2 + 1 - a) + 0.3 * a.sqrt() * torch.tanh(2 * x)
        v = 0.5 * torch.tanh(x.sum(-1, keepdim=True)).expand_as(x)
        return torch.cat([eps, v], -1)


def diffusion_model(dim: int, shift: float, s: float, condition: str = "none", length: int = 4) -> RasterAR:
    """RasterAR (backbone seed 0, weights ~ N(0, 0.5²) for context dependence) with a GaussianDataDenoiser head."""
    m = model(length=length, dim=dim, head="diffusion", condition=condition, seed=0, scale=0.5, **DIFFUSION)
    m.output_head.net = GaussianDataDenoiser(m.output_head, dim, shift, s, seed=7)
    return m.eval()


class AlwaysAcceptMixin:
    """Biased: no trajectory ratio (every draft accepted) — the output is the draft's law."""

    def sample(self, z, z_uncond, params, generator, with_log_prob=True):
        v, _ = super().sample(z, z_uncond, params, generator, with_log_prob=False)
        return v, torch.zeros(z.shape[0], dtype=torch.float64)

    def log_prob(self, v, z, z_uncond, params):
        return torch.zeros(z.shape[0], dtype=torch.float64)


class DraftFinalFunctionMixin:
    """Biased: the ratio of the stochastic states ``(x_S, …, x_1)`` as drawn, output the draft's ``f_d(x_1)``."""

    def sample(self, z, z_uncond, params, generator, with_log_prob=True):
        v, _ = super().sample(z, z_uncond, params, generator, with_log_prob=False)
        return v, self.log_prob(v, z, z_uncond, params)

    def log_prob(self, v, z, z_uncond, params):
        return self.states_log_prob(v[:, :-1].to(z.dtype), z, z_uncond, params)


class AlwaysAccept(AlwaysAcceptMixin, DiffusionLaw):
    pass


class DraftFinalFunction(DraftFinalFunctionMixin, DiffusionLaw):
    pass


class Biased(ContinuousSD):
    def __init__(self, law_class, **kw):
        super().__init__(**kw)
        self.law_class = law_class

    def law(self, model, what):
        return self.law_class(model.output_head) if hasattr(self, "law_class") else super().law(model, what)


def diffusion_stats(x: Tensor) -> list[Tensor]:
    """Marginals of every position and channel, and projections across positions and channels: ``x: [N, L, D]``."""
    out = [x[:, i, c] for i in range(x.shape[1]) for c in range(x.shape[2])]
    out += [x[:, 1:].sum((1, 2)), x[:, 2, 0] - x[:, 1, -1], x[:, 3].sum(1)]
    return out


def min_ks(a: Tensor, b: Tensor) -> float:
    return min(ks_2samp(s.numpy(), r.numpy()).pvalue for s, r in zip(diffusion_stats(a), diffusion_stats(b)))


@torch.no_grad()
def test_diffusion_law_samples_as_the_head_and_scores_its_own_draws():
    target = diffusion_model(2, 0.0, 0.3)
    head, params = target.output_head, SamplingParams()
    z = torch.randn(64, 16)
    law = DiffusionLaw(head)
    v, log_p = law.sample(z, None, params, torch.Generator().manual_seed(3))
    want = head.sample(z, params, torch.Generator().manual_seed(3))
    assert v.shape == (64, 5, 2)
    torch.testing.assert_close(v[:, -1], want)  # same arithmetic, same random draws in the same order
    # scoring the draw (Newton inverse of the last step) gives the density computed while sampling
    torch.testing.assert_close(law.log_prob(v, z, None, params), log_p, atol=2e-3, rtol=1e-5)
    # the change of variables: the token density integrates to 1 (1 step, D = 1, x_1 ~ N(0, 1), y = f(x_1))
    one = diffusion_model(1, 0.0, 0.3)
    law1, p1 = DiffusionLaw(one.output_head), SamplingParams(num_steps=1)
    y = torch.linspace(-8, 8, 4001)[:, None]
    z1 = torch.randn(1, 16).expand(4001, -1)
    dens = law1.log_prob(torch.stack([y, y], 1), z1, None, p1).exp()
    assert abs(float(dens.sum() * (y[1, 0] - y[0, 0])) - 1.0) < 1e-3


def cspd_matches_the_target_sampler(make, dim: int, condition: str) -> dict:
    """CSpD with a shifted, wider draft against the target's own sampler (KS), and the draft alone (must differ, so
    the test has power); returns ``last_stats``."""
    target, draft = make(dim, 0.0, 0.3, condition), make(dim, 0.3, 0.4, condition)
    cond = torch.arange(N_DIFFUSION) % 3 if condition == "class" else Condition(batch=N_DIFFUSION)
    params = SamplingParams(guidance_scale=1.5) if condition == "class" else SamplingParams()
    dec = ContinuousSD(draft=draft, gamma=3)
    sd = target.generate(cond, params, torch.Generator().manual_seed(1), decoding=dec).data
    seq = target.generate(cond, params, torch.Generator().manual_seed(2)).data
    assert min_ks(sd, seq) > ALPHA
    s = dec.last_stats
    assert 0.1 < s["acceptance_rate"] < 0.9, s
    assert min_ks(draft.generate(cond, params, torch.Generator().manual_seed(3)).data, seq) < 1e-6
    return s


@pytest.mark.parametrize("dim,condition", [(1, "none"), (2, "class")])
def test_diffusion_heads_match_the_target_sampler(dim, condition):
    s = cspd_matches_the_target_sampler(diffusion_model, dim, condition)
    # a batch waits for its slowest row (4 passes here, as sequential); the head cost is the price of scoring
    assert s["forward_passes"] <= 4 and s["target_head_evals"] > s["sequential_head_evals"]


def test_identical_diffusion_draft_accepts_everything():
    target = diffusion_model(2, 0.0, 0.3)
    dec = ContinuousSD(draft=target, gamma=3)
    target.generate(Condition(batch=64), generator=torch.Generator().manual_seed(0), decoding=dec)
    s = dec.last_stats
    assert s["acceptance_rate"] == 1.0 and s["forward_passes"] == 2 and s["proposed"] == 64 * 3
    assert s["draft_head_evals"] == 64 * 3 * 4 and s["sequential_head_evals"] == 64 * 4 * 4
    # target: the first token by the sampler (4 steps) + scoring 3 drafts (3 steps + >= 1 Newton step); no bonus
    assert s["target_head_evals"] >= 64 * (4 + 3 * 4)


# ------------------------------------------------------------------ flow heads (solver="sde")
FLOW = dict(depth=1, mlp_width=16, num_sampling_steps=4, solver="sde")


class GaussianDataVelocity(torch.nn.Module):
    """A velocity close to the exact one for data ``x0 ~ N(mu(z), s²)``, ``mu(z) = shift + tanh(z W)/2``, in the flow
    head's convention ``x_t = (1 − t)·x0 + t·ε``: ``E[ε − x0 | x_t] + 0.3·t·tanh(2x)`` (the last term makes the last
    step ``f(x) = x − t_1·v`` nonlinear; ``t_1·Lip(v) < 1`` at ``t_1 = 1/4``, so ``f`` is injective)."""

    def __init__(self, head, dim: int, shift: float, s: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(head.width, dim, generator=g) / math.sqrt(head.width))
        self.shift, self.s = shift, s

    def forward(self, x: Tensor, t_model: Tensor, z: Tensor) -> Tensor:
        t = (t_model / 1000.0)[:, None]
        mu = self.shift + 0.5 * torch.tanh(z.float() @ self.w)
        m, var = (1 - t) * mu, (1 - t) ** 2 * self.s ** 2 + t ** 2
        e_x0 = mu + (1 - t) * self.s ** 2 / var * (x - m)
        e_eps = t / var * (x - m)
        return e_eps - e_x0 + 0.3 * t * torch.tanh(2 * x)


def flow_model(dim: int, shift: float, s: float, condition: str = "none", length: int = 4) -> RasterAR:
    """RasterAR (backbone seed 0, weights ~ N(0, 0.5²)) with a GaussianDataVelocity "sde" flow head."""
    m = model(length=length, dim=dim, head="flow", condition=condition, seed=0, scale=0.5, **FLOW)
    m.output_head.net = GaussianDataVelocity(m.output_head, dim, shift, s, seed=7)
    return m.eval()


@torch.no_grad()
def test_flow_law_samples_as_the_head_and_scores_its_own_draws():
    head, params = flow_model(2, 0.0, 0.3).output_head, SamplingParams()
    z = torch.randn(64, 16)
    law = FlowLaw(head)
    v, log_p = law.sample(z, None, params, torch.Generator().manual_seed(3))
    want = head.sample(z, params, torch.Generator().manual_seed(3))
    assert v.shape == (64, 5, 2)
    torch.testing.assert_close(v[:, -1], want)  # same arithmetic, same random draws in the same order
    torch.testing.assert_close(law.log_prob(v, z, None, params), log_p, atol=2e-3, rtol=1e-5)
    # the change of variables: given x_2, the token density integrates to 1 (2 steps, D = 1, V = (x_2, x_1, y),
    # y = f(x_1); one Euler step from t = 1 on the exact velocity would map every x to mu, so 1 step has no density)
    law2, p2 = FlowLaw(flow_model(1, 0.0, 0.5).output_head), SamplingParams(num_steps=2)
    y = torch.linspace(-8, 8, 4001)[:, None]
    x2 = torch.full_like(y, 0.5)
    dens = law2.log_prob(torch.stack([x2, y, y], 1), torch.randn(1, 16).expand(4001, -1), None, p2).exp()
    want = math.exp(float(norm.logpdf(0.5)))
    assert abs(float(dens.sum() * (y[1, 0] - y[0, 0])) / want - 1.0) < 1e-3
    # noise_temperature = 0 leaves no density
    cold = flow_model(1, 0.0, 0.3)
    cold.output_head.noise_temperature = 0.0
    with pytest.raises(ValueError, match="flow head FlowHead has noise_temperature=0"):
        FlowLaw(cold.output_head).size(params)


@pytest.mark.parametrize("dim,condition", [(1, "none"), (2, "class")])
def test_flow_heads_match_the_target_sampler(dim, condition):
    s = cspd_matches_the_target_sampler(flow_model, dim, condition)
    print(f"flow CSpD dim={dim} {condition}: acceptance {s['acceptance_rate']:.3f}, passes {s['forward_passes']}")


class FlowAlwaysAccept(AlwaysAcceptMixin, FlowLaw):
    pass


class FlowDraftFinalFunction(DraftFinalFunctionMixin, FlowLaw):
    pass


@pytest.mark.parametrize("make,law_class", [
    (diffusion_model, AlwaysAccept), (diffusion_model, DraftFinalFunction),
    (flow_model, FlowAlwaysAccept), (flow_model, FlowDraftFinalFunction)])
def test_biased_variants_are_detected(make, law_class):
    target, draft = make(1, 0.0, 0.3), make(1, 0.3, 0.4)
    dec = Biased(law_class, draft=draft, gamma=3)
    sd = target.generate(Condition(batch=N_DIFFUSION), generator=torch.Generator().manual_seed(1), decoding=dec).data
    seq = target.generate(Condition(batch=N_DIFFUSION), generator=torch.Generator().manual_seed(2)).data
    print(f"{law_class.__name__}: min KS p {min_ks(sd, seq):.3g}")
    assert min_ks(sd, seq) < 1e-6


def test_identical_flow_draft_accepts_everything():
    target = flow_model(2, 0.0, 0.3)
    dec = ContinuousSD(draft=target, gamma=3)
    target.generate(Condition(batch=64), generator=torch.Generator().manual_seed(0), decoding=dec)
    s = dec.last_stats
    assert s["acceptance_rate"] == 1.0 and s["forward_passes"] == 2 and s["proposed"] == 64 * 3
    assert s["draft_head_evals"] == 64 * 3 * 4 and s["sequential_head_evals"] == 64 * 4 * 4
