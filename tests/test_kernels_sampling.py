"""tokenloom.kernels.sample / sample_bits: exact distributions (chi-square), path agreement, per-row
params and generators, bad input. The Triton kernel runs under TRITON_INTERPRET=1 on CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
from scipy.stats import chisquare  # noqa: E402

from tokenloom import kernels  # noqa: E402
from tokenloom.config import SamplingParams  # noqa: E402
from tokenloom.kernels.reference import filtered_probs  # noqa: E402

BIT_PATHS = ("reference", "torch", "triton")
PATHS = BIT_PATHS + (("numba",) if kernels.numba_available() else ())  # numba: optional (tokenloom[fast])
SAMPLES = {"reference": 20_000, "torch": 20_000, "triton": 4_000, "numba": 20_000}  # the interpreter is slow
needs_numba = pytest.mark.skipif(not kernels.numba_available(), reason="numba not installed (tokenloom[fast])")


def _row(v=12, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, v, generator=g) * scale


def _chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the sampled counts against ``probs`` (cells with expected count < 5 pooled)."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "sampled a token outside the kept set"
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big & (probs > 0)].sum()[None]])
    exp = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    exp = exp * (obs.sum() / exp.sum())  # float64 rounding: the totals must agree for scipy
    if obs.numel() < 2:
        return 1.0
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


CONFIGS = {
    "temperature": (SamplingParams(temperature=0.7), False),
    "top_k": (SamplingParams(top_k=4), False),
    "top_p": (SamplingParams(top_p=0.7), False),
    "min_p": (SamplingParams(min_p=0.2), False),
    "guidance": (SamplingParams(guidance_scale=2.5, temperature=1.3), True),
    "all": (SamplingParams(guidance_scale=1.5, temperature=0.8, min_p=0.02, top_k=7, top_p=0.9), True),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_frequencies_match_filtered_probs(path, name):
    params, guided = CONFIGS[name]
    cond, uncond = _row(seed=1), (_row(seed=2) if guided else None)
    probs = filtered_probs(cond, params, uncond)[0]
    assert 0 < int((probs > 0).sum()) < 12 or name in ("temperature", "guidance")
    n = SAMPLES[path]
    tokens = kernels.sample(cond.expand(n, -1), params, torch.Generator().manual_seed(7),
                            uncond_logits=None if uncond is None else uncond.expand(n, -1), backend=path)
    assert _chi_square(tokens, probs) > 1e-3


@pytest.mark.parametrize("path", PATHS)
def test_greedy_is_first_argmax(path):
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, -1.0, 5.0, 0.0], [-2.0, -1.0, -3.0, -1.5]])
    params = SamplingParams(temperature=0.0, top_k=2, top_p=0.5)
    tokens = kernels.sample(logits, params, torch.Generator().manual_seed(0), backend=path)
    assert tokens.tolist() == [1, 0, 1]


@pytest.mark.parametrize("path", BIT_PATHS)
def test_bits_frequencies(path):
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 3, generator=g), torch.randn(1, 3, generator=g)
    params = SamplingParams(guidance_scale=2.0, temperature=1.5, top_p=0.9, min_p=0.05)
    pairs = torch.stack([torch.zeros_like(cond), cond], -1)[0]
    upairs = torch.stack([torch.zeros_like(uncond), uncond], -1)[0]
    probs1 = filtered_probs(pairs, params, upairs)[:, 1]  # P(bit = 1) per bit
    n = SAMPLES[path] // 2
    bits = kernels.sample_bits(cond.expand(n, -1), params, torch.Generator().manual_seed(4),
                               uncond_logits=uncond.expand(n, -1), backend=path)
    assert bits.shape == (n, 3) and set(bits.unique().tolist()) <= {0, 1}
    for j in range(3):
        assert _chi_square(bits[:, j], torch.stack([1 - probs1[j], probs1[j]])) > 1e-3


def test_bits_paths_agree_and_pair_form():
    g = torch.Generator().manual_seed(5)
    b, nbits = 64, 6
    log_odds, uncond = torch.randn(b, nbits, generator=g) * 2, torch.randn(b, nbits, generator=g)
    params = SamplingParams(temperature=torch.rand(b, generator=g) * 2, top_k=torch.randint(0, 3, (b,), generator=g),
                            top_p=torch.rand(b, generator=g) * 0.9 + 0.1, min_p=torch.rand(b, generator=g) * 0.5,
                            guidance_scale=1.7)
    out = {p: kernels.sample_bits(log_odds, params, torch.Generator().manual_seed(1), uncond_logits=uncond,
                                  backend=p) for p in BIT_PATHS}
    assert torch.equal(out["reference"], out["torch"]) and torch.equal(out["reference"], out["triton"])
    pairs = torch.stack([torch.zeros_like(log_odds), log_odds], -1)
    upairs = torch.stack([torch.zeros_like(uncond), uncond], -1)
    same = kernels.sample_bits(pairs, params, torch.Generator().manual_seed(1), uncond_logits=upairs)
    assert torch.equal(same, out["torch"])
    top1 = kernels.sample_bits(log_odds, SamplingParams(top_k=1), torch.Generator().manual_seed(1))
    assert torch.equal(top1, (log_odds > 0).long())


def _random_case(b, v, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randint(0, 4, (b, v), generator=g).float() if ties else torch.randn(b, v, generator=g) * 3
    uncond = torch.randn(b, v, generator=g) * 3
    temperature = torch.rand(b, generator=g) * 2
    temperature[::5] = 0
    min_p = torch.rand(b, generator=g) * 0.1
    min_p[::3] = 0
    top_p = torch.rand(b, generator=g) * 0.9 + 0.1
    top_p[1::4] = 1.0
    params = SamplingParams(temperature=temperature, top_k=torch.randint(0, v // 3 + 1, (b,), generator=g),
                            top_p=top_p, min_p=min_p, guidance_scale=1.0 if ties else 1.7)
    return cond, (None if ties else uncond), params


@pytest.mark.parametrize("b,v,ties", [(256, 1000, False), (16, 16384, False), (128, 300, True)])
def test_torch_path_matches_reference_token_for_token(b, v, ties):
    cond, uncond, params = _random_case(b, v, seed=v, ties=ties)
    # top_k = v // 20 takes the two-level (column maxima) candidate selection; v // 10 the direct one.
    for p in (params, SamplingParams(top_k=v // 10), SamplingParams(top_p=0.8), SamplingParams(min_p=0.1),
              SamplingParams(top_k=v // 10, top_p=0.9), SamplingParams(),
              SamplingParams(top_k=v // 20, top_p=0.95, temperature=0.8, guidance_scale=1.5)):
        ref = kernels.sample(cond, p, torch.Generator().manual_seed(2), uncond_logits=uncond, backend="reference")
        fast = kernels.sample(cond, p, torch.Generator().manual_seed(2), uncond_logits=uncond, backend="torch")
        assert torch.equal(ref, fast), p


@needs_numba
@pytest.mark.parametrize("b,v,ties", [(256, 1000, False), (32, 16384, False), (128, 300, True)])
def test_numba_path_matches_reference_token_for_token(b, v, ties):
    """Same cases as the torch path. The numba kernel's exp and mass sums round differently from the
    reference's (numba_sampling docstring), so a token may differ only at a rounding boundary: these
    seeded cases have none."""
    cond, uncond, params = _random_case(b, v, seed=v, ties=ties)
    for p in (params, SamplingParams(top_k=v // 10), SamplingParams(top_p=0.8), SamplingParams(min_p=0.1),
              SamplingParams(top_k=v // 10, top_p=0.9), SamplingParams(),
              SamplingParams(top_k=v // 20, top_p=0.95, temperature=0.8, guidance_scale=1.5),
              SamplingParams(top_k=900 if v > 900 else 9, top_p=0.96, guidance_scale=1.5)):
        ref = kernels.sample(cond, p, torch.Generator().manual_seed(2), uncond_logits=uncond, backend="reference")
        fast = kernels.sample(cond, p, torch.Generator().manual_seed(2), uncond_logits=uncond, backend="numba")
        assert torch.equal(ref, fast), (p, (ref != fast).nonzero())


@needs_numba
@pytest.mark.parametrize("case", ["sample_too_high", "crowded_bucket", "min_p_binding", "top_p_tail"])
def test_numba_selection_paths_match_reference(case):
    """The numba kernel's less common paths, token for token against the reference: a strided sample that
    overestimates the top-k threshold (fewer than k pass; the threshold steps down), a bucket crowded with
    ties (sorted by argsort rather than insertion), min-p as the binding candidate bound, and top-p's
    tail bound on a wide row (most of the row below it)."""
    from tokenloom.kernels.numba_sampling import SAMPLE

    g = torch.Generator().manual_seed(11)
    b, v = 8, 8192
    cond, uncond = torch.randn(b, v, generator=g), None
    params = SamplingParams(top_k=500, top_p=0.95)
    if case == "sample_too_high":  # every sampled position is high, the rest low
        cond = torch.full((b, v), -10.0) + torch.rand(b, v, generator=g)
        cond[:, :: v // SAMPLE] = 5.0 + torch.rand(b, SAMPLE, generator=g)
    elif case == "crowded_bucket":  # 4 values only: thousands of exact ties per bucket
        cond = torch.randint(0, 4, (b, v), generator=g).float()
    elif case == "min_p_binding":
        cond, params = cond * 5, SamplingParams(top_k=3000, min_p=0.01, top_p=0.99)
    else:
        cond, uncond = cond * 2, torch.randn(b, v, generator=g) * 2  # much of the mass in the wide tail
        params = SamplingParams(top_p=0.9, guidance_scale=1.5)
    ref = kernels.sample(cond, params, torch.Generator().manual_seed(5), uncond_logits=uncond, backend="reference")
    fast = kernels.sample(cond, params, torch.Generator().manual_seed(5), uncond_logits=uncond, backend="numba")
    assert torch.equal(ref, fast)


@needs_numba
def test_numba_checks_finiteness_and_overflow():
    """The numba backend skips the finiteness sums and checks as it reads: same errors; finite logits
    whose guided values overflow fall back to the reference."""
    x = torch.randn(4, 10)
    with pytest.raises(ValueError, match="logits contain NaN"):
        kernels.sample(torch.where(x > 1, float("nan"), x), SamplingParams(), backend="numba")
    with pytest.raises(ValueError, match="uncond_logits contain NaN or infinite"):
        kernels.sample(x, SamplingParams(guidance_scale=2.0), uncond_logits=torch.full((4, 10), float("inf")),
                       backend="numba")
    with pytest.raises(ValueError, match="uncond_logits contain NaN or infinite"):  # given, scale 1: not read
        kernels.sample(x, SamplingParams(), uncond_logits=torch.full((4, 10), float("nan")), backend="numba")
    with pytest.raises(ValueError, match="logits contain NaN or infinite"):
        kernels.sample(torch.full((4, 10), -float("inf")), SamplingParams(), backend="numba")
    big = torch.full((2, 10), 3e38)
    big[:, 3] = -3e38
    p = SamplingParams(guidance_scale=3.0, top_k=3)
    out = kernels.sample(big, p, torch.Generator().manual_seed(0), uncond_logits=-big, backend="numba")
    ref = kernels.sample(big, p, torch.Generator().manual_seed(0), uncond_logits=-big, backend="reference")
    assert torch.equal(out, ref)


@pytest.mark.parametrize("b,v,ties", [(48, 40, False), (24, 30, True), (3, 5000, False)])
def test_triton_matches_reference_token_for_token(b, v, ties):
    """(3, 5000): two blocks of 4096, the scratch-row path."""
    cond, uncond, params = _random_case(b, v, seed=v + 1, ties=ties)
    ref = kernels.sample(cond, params, torch.Generator().manual_seed(3), uncond_logits=uncond, backend="reference")
    tri = kernels.sample(cond, params, torch.Generator().manual_seed(3), uncond_logits=uncond, backend="triton")
    assert torch.equal(ref, tri)


@pytest.mark.parametrize("path", PATHS)
def test_per_row_params_and_generators(path):
    """Row i with per-row params and generator[i] equals row i sampled alone with scalars and that seed."""
    g = torch.Generator().manual_seed(9)
    b, v = 6, 50
    cond, uncond = torch.randn(b, v, generator=g) * 2, torch.randn(b, v, generator=g) * 2
    temperature = torch.tensor([1.0, 0.5, 0.0, 2.0, 1.0, 0.8])
    top_k = torch.tensor([0, 5, 3, 20, 1, 10])
    top_p = torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0, 0.95])
    min_p = torch.tensor([0.0, 0.1, 0.0, 0.05, 0.0, 0.2])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, guidance_scale=1.3)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(b)]
    batch = kernels.sample(cond, params, gens, uncond_logits=uncond, backend=path)
    for i in range(b):
        alone = SamplingParams(temperature=float(temperature[i]), top_k=int(top_k[i]), top_p=float(top_p[i]),
                               min_p=float(min_p[i]), guidance_scale=1.3)
        tok = kernels.sample(cond[i:i + 1], alone, torch.Generator().manual_seed(100 + i),
                             uncond_logits=uncond[i:i + 1], backend=path)
        assert tok.item() == batch[i].item(), i
    # Re-seeding one generator can only change its own row.
    gens = [torch.Generator().manual_seed(100 + i) for i in range(b)]
    gens[3] = torch.Generator().manual_seed(12345)
    other = kernels.sample(cond, params, gens, uncond_logits=uncond, backend=path)
    assert torch.equal(torch.cat([other[:3], other[4:]]), torch.cat([batch[:3], batch[4:]]))


def test_same_seed_same_tokens_and_default_backend():
    cond = torch.randn(32, 500)
    params = SamplingParams(top_k=50, top_p=0.9)
    a = kernels.sample(cond, params, torch.Generator().manual_seed(0))
    b = kernels.sample(cond, params, torch.Generator().manual_seed(0))
    c = kernels.sample(cond, params, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, kernels.sample(cond, params, torch.Generator().manual_seed(0), backend="reference"))


@pytest.mark.parametrize("path", [p for p in PATHS if p in ("torch", "numba")])
def test_low_precision_logits(path):
    cond = (torch.randn(16, 300) * 3).to(torch.bfloat16)  # many exact ties
    params = SamplingParams(top_k=40, top_p=0.8)
    ref = kernels.sample(cond, params, torch.Generator().manual_seed(0), backend="reference")
    fast = kernels.sample(cond, params, torch.Generator().manual_seed(0), backend=path)
    assert torch.equal(ref, fast)


@pytest.mark.parametrize("path", [p for p in PATHS if p in ("torch", "numba")])
def test_strided_and_grad_logits(path):
    big = torch.randn(8, 20_000, requires_grad=True)
    cond, uncond = big[:, :16_384], big[:, 1000:17_384]  # non-contiguous views of a leaf with grad
    params = SamplingParams(top_k=900, top_p=0.9, guidance_scale=1.5)
    ref = kernels.sample(cond, params, torch.Generator().manual_seed(0), uncond_logits=uncond, backend="reference")
    fast = kernels.sample(cond, params, torch.Generator().manual_seed(0), uncond_logits=uncond, backend=path)
    assert torch.equal(ref, fast)


def test_bad_input_is_named():
    x = torch.randn(4, 10)
    ok = SamplingParams()
    with pytest.raises(ValueError, match="logits contain NaN"):
        kernels.sample(torch.where(x > 1, float("nan"), x), ok)
    with pytest.raises(ValueError, match="uncond_logits contain NaN or infinite"):
        kernels.sample(x, SamplingParams(guidance_scale=2.0), uncond_logits=torch.full((4, 10), float("inf")))
    with pytest.raises(ValueError, match="logits contain NaN or infinite"):
        kernels.sample(torch.full((4, 10), -float("inf")), ok)
    with pytest.raises(ValueError, match="uncond_logits must have the shape"):
        kernels.sample(x, ok, uncond_logits=torch.randn(4, 11))
    with pytest.raises(ValueError, match="SamplingParams.top_p has 3 per-row values"):
        kernels.sample(x, SamplingParams(top_p=torch.tensor([0.5, 0.6, 0.7])))
    with pytest.raises(ValueError, match="SamplingParams.temperature has 5 per-row values"):
        kernels.sample(x, SamplingParams(temperature=torch.ones(5)))
    with pytest.raises(ValueError, match="top_k must be <= the vocabulary size 10, got 11"):
        kernels.sample(x, SamplingParams(top_k=11))
    with pytest.raises(ValueError, match="top_k must be <= the vocabulary size 10, got 12"):
        kernels.sample(x, SamplingParams(top_k=torch.tensor([1, 2, 12, 3])))
    with pytest.raises(ValueError, match="generator must be one torch.Generator or a list of 4"):
        kernels.sample(x, ok, [torch.Generator()] * 3)
    with pytest.raises(ValueError, match="backend must be None or one of"):
        kernels.sample(x, ok, backend="cuda")
    with pytest.raises(ValueError, match=r"logits must have shape \[B, V\]"):
        kernels.sample(torch.randn(10), ok)
    with pytest.raises(ValueError, match=r"bit_logits must have shape \[B, bits\]"):
        kernels.sample_bits(torch.randn(4, 3, 3), ok)
    with pytest.raises(ValueError, match="bit_logits contain NaN"):
        kernels.sample_bits(torch.full((4, 3), float("nan")), ok)
    with pytest.raises(ValueError, match="SamplingParams.min_p has 2 per-row values but bit_logits has 4"):
        kernels.sample_bits(torch.randn(4, 3), SamplingParams(min_p=torch.zeros(2)))


@pytest.mark.slow
def test_compiled_torch_path_matches_reference():
    """torch.compile takes ~40 s on first use, hence slow."""
    for b, v, ties in ((64, 1000, False), (32, 16384, False), (64, 300, True)):
        cond, uncond, params = _random_case(b, v, seed=v + 2, ties=ties)
        for p in (params, SamplingParams(top_k=v // 20, top_p=0.95, guidance_scale=1.5)):
            ref = kernels.sample(cond, p, torch.Generator().manual_seed(4), uncond_logits=uncond, backend="reference")
            out = kernels.sample(cond, p, torch.Generator().manual_seed(4), uncond_logits=uncond,
                                 backend="torch-compiled")
            assert torch.equal(ref, out)
