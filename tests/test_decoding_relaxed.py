"""LANTERN and grouped speculative decoding: the relaxed target stays within total variation delta of the model
(exactly, per position) and the measured distances of the samples respect the stated bounds on toy models."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from tokenloom.generators.decoding import LANTERN, GroupedSD
from tokenloom.generators.decoding.grouped import rank_groups
from tokenloom.generators.decoding.lantern import codebook_neighbours
from tokenloom.generators.decoding.relaxed import relaxed_target, total_variation
from tokenloom.generators.decoding.toy import ToyOrderedTarget, sequence_codes
from tokenloom.kernels import speculative_accept


def _dirichlet(rows, v, seed, alpha=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch._standard_gamma(torch.full((rows, v), alpha, dtype=torch.float64), generator=g)
    return (x / x.sum(-1, keepdim=True)).float()


@pytest.mark.parametrize("delta", [0.0, 0.02, 0.1, 0.3, 1.0])
def test_relaxed_target_stays_within_delta_and_moves_towards_the_draft(delta):
    v = 12
    p, q = _dirichlet(500, v, 0), _dirichlet(500, v, 1)
    nbrs = codebook_neighbours(torch.randn(v, 3, generator=torch.Generator().manual_seed(2)), 4)
    out = relaxed_target(p, q, nbrs, None, delta)
    assert (out >= 0).all() and torch.allclose(out.sum(-1), torch.ones(500), atol=1e-5)
    tv = total_variation(out, p)
    assert float(tv.max()) <= delta + 1e-5
    assert (total_variation(out, q) <= total_variation(p, q) + 1e-5).all()  # acceptance never falls
    if delta == 0:
        assert torch.equal(out, p)
    if delta == 1.0:
        assert float(tv.mean()) > 0.05  # the relaxation does something
    members, allowed = rank_groups(p, 2, 0.2)
    grouped = relaxed_target(p, q, members, allowed, delta)
    assert float(total_variation(grouped, p).max()) <= delta + 1e-5


def test_one_hot_draft_gets_its_neighbours_mass_up_to_delta():
    """Deterministic drafts: p*(x) = p(x) + min(delta, p(neighbours of x)) — LANTERN's A_{k,delta}(x)."""
    v, delta = 10, 0.15
    p = _dirichlet(300, v, 3)
    x = torch.randint(0, v, (300,), generator=torch.Generator().manual_seed(4))
    q = torch.nn.functional.one_hot(x, v).float()
    nbrs = codebook_neighbours(torch.randn(v, 2, generator=torch.Generator().manual_seed(5)), 3)
    out = relaxed_target(p, q, nbrs, None, delta)
    mass = p.gather(1, nbrs[x]).sum(-1)
    want = p.gather(1, x[:, None])[:, 0] + torch.clamp(mass, max=delta)
    assert torch.allclose(out.gather(1, x[:, None])[:, 0], want, atol=1e-5)


def test_speculative_acceptance_against_the_relaxed_target_samples_it_exactly():
    v, n, delta = 6, 200_000, 0.2
    p, q = _dirichlet(1, v, 6).expand(n, v), _dirichlet(1, v, 7).expand(n, v)
    nbrs = codebook_neighbours(torch.randn(v, 2, generator=torch.Generator().manual_seed(8)), 2)
    target = relaxed_target(p[:1], q[:1], nbrs, None, delta)[0]
    gen = torch.Generator().manual_seed(9)
    drafts = torch.multinomial(q[:1], n, replacement=True, generator=gen).T
    pstar = target.expand(n, 1, v)
    n_acc, nxt = speculative_accept(drafts, pstar, gen, draft_probs=q[:, None])
    out = torch.where(n_acc == 1, drafts[:, 0], nxt)
    counts = torch.bincount(out, minlength=v).double()
    assert chisquare(counts.numpy(), (target.double() * n).numpy()).pvalue > 1e-3
    assert float(total_variation(target, p[0])) <= delta + 1e-6
    # acceptance rate = 1 - TV(p*, q) >= the exact rate 1 - TV(p, q)
    assert float(total_variation(target, q[0])) <= float(total_variation(p[0], q[0])) + 1e-6


def _measured_distances(tokens, toy):
    """Largest per-prefix conditional TV (prefixes with >= 2000 samples) and the joint TV of the samples."""
    v, length = toy.vocab_size, toy.length
    worst = 0.0
    for t in range(length):
        prefix = sequence_codes(tokens[:, :t], v) if t else torch.zeros(tokens.shape[0], dtype=torch.long)
        for code in range(v**t):
            rows = prefix == code
            if int(rows.sum()) < 2000:
                continue
            emp = torch.bincount(tokens[rows, t], minlength=v).double() / rows.sum()
            worst = max(worst, float(total_variation(emp, toy.tables[t][code].exp())))
    emp = torch.bincount(sequence_codes(tokens, v), minlength=v**length).double() / tokens.shape[0]
    return worst, float(total_variation(emp, toy.joint()))


@pytest.mark.parametrize("method", ["lantern", "grouped", pytest.param("exact", marks=pytest.mark.slow)])
def test_measured_total_variation_within_the_bound(method):
    """Per token (given its prefix) TV <= delta; joint TV <= L·delta (plus sampling noise: 100,000 samples, prefixes
    with >= 2,000; measured here: LANTERN 0.108 / 0.100, grouped 0.097 / 0.072 (worst conditional / joint) for
    delta = 0.1, and 0.015 / 0.006 at delta = 0 — the relaxation spends its budget)."""
    n, length, v, delta = 100_000, 3, 4, 0.1
    toy = ToyOrderedTarget(n, length, v, seed=11, sharpness=1.0)
    if method == "lantern":
        dec = LANTERN(torch.randn(v, 2, generator=torch.Generator().manual_seed(3)), k=2, delta=delta, window=3)
    elif method == "grouped":
        dec = GroupedSD(delta=delta, radius=1, tolerance=0.3, window=3)
    else:
        dec = LANTERN(torch.randn(v, 2), k=2, delta=0.0, window=3)
    tokens = dec.run(toy, torch.Generator().manual_seed(12))
    worst, joint_tv = _measured_distances(tokens, toy)
    noise = 0.025
    assert worst <= dec.delta + noise
    assert joint_tv <= length * dec.delta + noise
    if method != "exact":
        assert worst > 0.05  # the relaxation is active on this model (else the test would prove nothing)
    else:
        assert worst < noise
