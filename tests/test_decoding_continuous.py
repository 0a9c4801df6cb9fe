"""Continuous speculative decoding (``ContinuousSD``) and the ``"gaussian"`` head.

Exactness: on RasterAR models with GaussianHead the output law must be the target's — one-sample KS against the known
Gaussian (context-free toy, first position of a context-dependent model) and two-sample KS against sequential
decoding, >= 20,000 samples, p > 0.001; the acceptance rate must be ``1 − TV(p_t, p_d)`` within binomial noise.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp, kstest, norm

from tokenloom.config import SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.decoding import ContinuousSD
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
    diffusion = model(head="diffusion", depth=1, mlp_width=16)
    with pytest.raises(ValueError, match="no tractable density"):
        ContinuousSD(draft=diffusion)
    with pytest.raises(ValueError, match="no tractable density"):
        diffusion.generate(Condition(batch=2), decoding=ContinuousSD(draft=target))
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
