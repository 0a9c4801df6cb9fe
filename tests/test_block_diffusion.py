"""BlockDiffusion: skip-causal mask, cached == full, passes per image, AR limit, exact sampler distribution, seeds,
per-row generators, save/load, training, input errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from pipeline_tiny import randomize
from random_order_tiny import cond_for
from scipy.stats import chisquare

from tokenloom import generators, kernels
from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.generators.block_diffusion import BlockDiffusion
from tokenloom.generators.block_diffusion_layers import (
    CLEAN,
    NOISY,
    PREFIX,
    BlockState,
    MaskedProcess,
    cat_layouts,
    masked_after_steps,
    prefix_layout,
    skip_causal_mask,
    token_layout,
    training_layout,
)
from tokenloom.generators.condition import Condition
from tokenloom.tokens import Grid, Scales, Sequence, Tokens, TokenSpec

INDEX = TokenSpec(kind="index", vocab_size=12, layout=Grid(4, 4))
CONT = TokenSpec(kind="continuous", dim=3, layout=Grid(2, 4))
HEAD = {"index": "categorical", "diffusion": "diffusion", "flow": "flow"}
HEAD_OPTIONS = {"index": None,
                "diffusion": {"depth": 1, "mlp_width": 32, "num_sampling_steps": 4, "clip_denoised": 3.0},
                "flow": {"depth": 1, "mlp_width": 32, "num_sampling_steps": 3}}


def make(kind: str = "index", condition: str = "class", block_size: int = 4, seed: int = 0, randomise: bool = True,
         **kw) -> BlockDiffusion:
    """A tiny model; ``randomise`` gives every weight a visible random value (the default init zeroes the
    categorical head and leaves the backbone near identity)."""
    torch.manual_seed(seed)
    extra = {"class": {"num_classes": 5}, "text": {"cond_dim": 6, "cond_len": 3}, "none": {}}[condition]
    spec = INDEX if kind == "index" else CONT
    model = generators.build("block_diffusion", token_spec=spec.to_dict(), block_size=block_size, width=32, depth=2,
                             num_heads=4, multiple_of=16, condition=condition, head=HEAD[kind],
                             head_options=HEAD_OPTIONS[kind], **{**extra, **kw})
    return randomize(model, seed) if randomise else model.eval()


def gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------------------------- the mask
def loop_reference_mask(p: int, length: int, k: int) -> torch.Tensor:
    """ACDiT's SCAM / BD3-LM's mask over [prefix P ; clean 0..L-K-1 ; noisy 0..L-1], built pair by pair."""
    positions = [("prefix", j) for j in range(p)] + [("clean", i) for i in range(length - k)] + \
        [("noisy", i) for i in range(length)]
    n = len(positions)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for a, (qk, qi) in enumerate(positions):
        for c, (kk, ki) in enumerate(positions):
            if qk == "prefix":
                ok = kk == "prefix" and ki <= qi
            elif kk == "prefix":
                ok = True
            elif qk == "clean":
                ok = kk == "clean" and ki // k <= qi // k
            else:  # noisy query: clean keys of earlier blocks, noisy keys of its own block
                ok = ki // k < qi // k if kk == "clean" else ki // k == qi // k
            mask[a, c] = ok
    return mask


@pytest.mark.parametrize("p,length,k", [(1, 8, 2), (2, 6, 3), (3, 5, 1), (1, 6, 6), (0, 4, 2), (2, 12, 4)])
def test_skip_causal_mask_matches_loop_reference(p, length, k):
    layout = training_layout(p, length, k)
    assert layout.length == p + 2 * length - k
    assert torch.equal(skip_causal_mask(layout, layout), loop_reference_mask(p, length, k))


def test_cached_pass_masks_are_rows_of_the_full_mask():
    """Queries [clean block i-1 ; noisy block i] over keys [prefix ; clean 0..i-1 ; noisy i] = the matching rows and
    columns of the dense loop reference."""
    p, length, k = 2, 12, 3
    full = loop_reference_mask(p, length, k)
    index = {("prefix", j): j for j in range(p)}
    index.update({("clean", i): p + i for i in range(length - k)})
    index.update({("noisy", i): p + length - k + i for i in range(length)})
    for blk in range(1, length // k):
        keys = [("prefix", j) for j in range(p)] + [("clean", i) for i in range(blk * k)] + \
            [("noisy", i) for i in range(blk * k, (blk + 1) * k)]
        queries = keys[-2 * k:]
        q = cat_layouts(token_layout(CLEAN, (blk - 1) * k, k, k), token_layout(NOISY, blk * k, k, k))
        key_layout = cat_layouts(prefix_layout(p), token_layout(CLEAN, 0, (blk - 1) * k, k), q)
        want = full[[index[x] for x in queries]][:, [index[x] for x in keys]]
        assert torch.equal(skip_causal_mask(q, key_layout), want)


def test_block_size_limits_of_the_mask():
    length = 6
    ar = training_layout(1, length, 1)
    m = skip_causal_mask(ar, ar)
    noisy = (ar.kind == NOISY).nonzero()[:, 0]
    clean = (ar.kind == CLEAN).nonzero()[:, 0]
    # block_size 1: noisy token i sees clean tokens j < i, itself among the noisy ones, and the prefix
    assert torch.equal(m[noisy][:, clean], torch.ones(length, length - 1, dtype=torch.bool).tril(-1))
    assert torch.equal(m[noisy][:, noisy], torch.eye(length, dtype=torch.bool))
    full = training_layout(1, length, length)
    m = skip_causal_mask(full, full)
    assert full.length == 1 + length and not bool((full.kind == CLEAN).any())
    assert bool(m[full.kind == NOISY].all())  # full-sequence diffusion: bidirectional over prefix + noisy
    assert bool(m[full.kind == PREFIX][:, 1:].logical_not().all())


# ------------------------------------------------------------------------------------------------- cached == full
def noisy_inputs(model: BlockDiffusion, b: int, seed: int = 1):
    """Clean ``Tokens.data`` and an embedded noisy stream ``[B, L, C]`` (masks or x_t at per-block levels)."""
    g = torch.Generator().manual_seed(seed)
    length, k = model.spec.length, model.block_size
    if model.spec.kind == "index":
        clean = torch.randint(0, 12, (b, length, 1), generator=g)
        noisy = torch.where(torch.rand(b, length, generator=g) < 0.5, model.mask_id, clean[..., 0])
        return clean, model.embed(noisy)
    clean = torch.randn(b, length, 3, generator=g)
    level = torch.rand(b, length // k, generator=g).repeat_interleave(k, 1)
    return clean, model.embed(torch.randn(b, length, 3, generator=g), level)


@pytest.mark.parametrize("kind,condition,guided,k", [
    ("index", "class", False, 4), ("index", "class", True, 4), ("index", "text", True, 2), ("index", "none", False, 1),
    ("index", "class", False, 16), ("flow", "class", True, 2), ("diffusion", "text", False, 4),
])
@torch.no_grad()
def test_cached_block_by_block_equals_full_skip_causal_pass(kind, condition, guided, k):
    model = make(kind, condition, block_size=k)
    cond = cond_for(condition)
    prefix = model.embed_prefix(cond, guided, drop=False)
    rows = prefix.x.shape[0]
    clean, noisy_x = noisy_inputs(model, rows)
    length = model.spec.length
    full = model.hidden(prefix, model.embed_clean(clean[:, :length - k]), noisy_x)
    assert full.shape == (rows, length, 32)

    cache = model.new_cache(rows)
    for blk in range(length // k):
        sl = slice(blk * k, (blk + 1) * k)
        pending = prefix if blk == 0 else model.embed_clean(clean[:, (blk - 1) * k:blk * k])
        z = model.cached_hidden(noisy_x[:, sl], blk, cache, pending)
        assert (z - full[:, sl]).abs().max() <= 1e-5
        again = model.cached_hidden(noisy_x[:, sl], blk, cache)  # a later denoising step of the same block
        assert (again - full[:, sl]).abs().max() <= 1e-5
    if length // k > 1:  # the clean stream matters: other clean tokens change z of later blocks
        other = model.hidden(prefix, model.embed_clean(clean.flip(0)[:, :length - k]), noisy_x)
        assert (other[:, k:] - full[:, k:]).abs().max() > 1e-3
        assert (other[:, :k] - full[:, :k]).abs().max() <= 1e-6  # block 0 sees no clean token
    if guided:
        assert (full[:rows // 2] - full[rows // 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["index", "flow"])
def test_generation_without_cache_gives_the_same_tokens(kind):
    model = make(kind, "class", block_size=2)
    cond = cond_for("class")
    params = SamplingParams(num_steps=2, guidance_scale=2.5, top_k=8)
    a = model.generate(cond, params, generator=torch.Generator().manual_seed(3))
    b = model.generate(cond, params, generator=torch.Generator().manual_seed(3), use_cache=False)
    if kind == "index":
        assert torch.equal(a.data, b.data)
    else:
        assert (a.data - b.data).abs().max() <= 1e-4


def test_flow_sde_solver_draws_from_the_callers_generator():
    """Block decoding with the stochastic flow solver: same seed, same tokens; another seed, other tokens."""
    model = make("flow", "class", block_size=4)
    model.output_head.solver = "sde"
    cond, params = cond_for("class"), SamplingParams(num_steps=2)
    torch.manual_seed(0)
    a = model.generate(cond, params, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # the global RNG must not matter
    b = model.generate(cond, params, generator=torch.Generator().manual_seed(3))
    c = model.generate(cond, params, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.data, b.data)
    assert (a.data - c.data).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------- passes
@pytest.mark.parametrize("kind,k,steps,guidance", [("index", 4, 2, 3.0), ("index", 16, 5, 1.0), ("index", 1, 1, 1.0),
                                                   ("diffusion", 2, 4, 2.0), ("flow", 8, 3, 1.0)])
def test_forward_passes_per_image_are_blocks_times_steps(kind, k, steps, guidance):
    model = make(kind, "class", block_size=k)
    calls = []
    handle = model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        out = model.generate(cond_for("class", b=2), SamplingParams(num_steps=steps, guidance_scale=guidance),
                             generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(calls) == model.spec.length // k * steps
    assert out.data.shape == (2, model.spec.length, model.spec.channels)


def test_masked_reveal_schedule():
    assert masked_after_steps(8, 3) == [5, 2, 0]
    assert masked_after_steps(4, 4) == [3, 2, 1, 0]
    assert masked_after_steps(5, 1) == [0]
    for k, s in itertools.product(range(1, 9), range(1, 9)):
        if s <= k:
            left = [k] + masked_after_steps(k, s)
            assert all(a > b for a, b in zip(left, left[1:])) and left[-1] == 0


# ------------------------------------------------------------------------------------------------- AR limit
@pytest.mark.parametrize("guidance", [1.0, 2.0])
@torch.no_grad()
def test_block_size_one_is_ar_sampling_from_a_full_causal_pass(guidance):
    model = make("index", "class", block_size=1)
    cond = cond_for("class", b=3)
    params = SamplingParams(num_steps=1, guidance_scale=guidance, temperature=1.3, top_k=9)
    seeds = [11, 12, 13]
    got = model.generate(cond, params, generator=gens(seeds)).data[..., 0]

    guided = guidance != 1.0
    prefix = model.embed_prefix(cond, guided, drop=False)
    length, b = model.spec.length, 3
    codes = torch.zeros(b, length, dtype=torch.long)
    masks = torch.full((b, length), model.mask_id)
    ref_gens = gens(seeds)
    for i in range(length):
        both = lambda t: torch.cat([t, t]) if guided else t  # noqa: E731
        z = model.hidden(prefix, model.embed(both(codes[:, :length - 1])), model.embed(both(masks)))[:, i]
        logits = model.output_head.logits(z)[:, 0]
        codes[:, i] = kernels.sample(logits[:b], params, ref_gens, uncond_logits=logits[b:] if guided else None)
    assert torch.equal(got, codes)
    assert len(set(codes.flatten().tolist())) > 3


def test_block_size_one_with_full_masking_trains_as_teacher_forced_ar():
    """K = 1 and mask ratio 1: every noisy token is [MASK] and sees the clean tokens before it, so the ELBO is the AR
    negative log-likelihood, exactly (no 1/t variance)."""
    model = make("index", "class", block_size=1, mask_ratio_min=1.0, mask_ratio_max=1.0)
    tokens, labels = tiny_data("index", 4)
    codes = tokens.data[..., 0]
    with torch.no_grad():
        loss = model(tokens, labels, generator=torch.Generator().manual_seed(0))["loss"]
        z = model.hidden(model.embed_prefix(Condition(labels=labels)), model.embed(codes[:, :-1]),
                         model.embed(torch.full_like(codes, model.mask_id)))
        logits = model.output_head.logits(z.flatten(0, 1))[:, 0]
    nll = torch.nn.functional.cross_entropy(logits, codes.flatten())
    assert abs(float(loss) - float(nll)) <= 1e-5


# ------------------------------------------------------------------------------------------------- exact sampling
@pytest.mark.parametrize("reveal_steps", [2, 1])
@torch.no_grad()
def test_masked_block_sampler_matches_the_enumerated_distribution(reveal_steps):
    """One block of two tokens over a vocabulary of 3. Two steps (random order): P(a, b) = ½ p(a|∅) p(b|a) +
    ½ p(b|∅) p(a|b); one step: both tokens from the fully masked block, p(a|∅) p(b|∅). Chi-square over 9 cells."""
    spec = TokenSpec(kind="index", vocab_size=3, layout=Sequence(2))
    torch.manual_seed(0)
    model = generators.build("block_diffusion", token_spec=spec.to_dict(), block_size=2, width=16, depth=1,
                             num_heads=2, multiple_of=16, condition="none").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.5 if p.dim() == 2 else 0.3))
    prefix = model.embed_prefix(Condition(batch=1))
    empty = torch.zeros(1, 0, 16)

    def probs(codes):  # p(token at each position | block state codes [2] with mask id 3)
        z = model.hidden(prefix, empty, model.embed(torch.tensor([codes])))[0]
        return model.output_head.logits(z)[:, 0].softmax(-1).double()

    p0 = probs([3, 3])
    table = torch.zeros(3, 3, dtype=torch.float64)
    for a, b in itertools.product(range(3), range(3)):
        if reveal_steps == 1:
            table[a, b] = p0[0, a] * p0[1, b]
        else:
            table[a, b] = 0.5 * p0[0, a] * probs([a, 3])[1, b] + 0.5 * p0[1, b] * probs([3, b])[0, a]
    assert abs(float(table.sum()) - 1) < 1e-6 and float(table.max()) < 0.6  # float32 softmax

    n = 6000
    out = model.generate(Condition(batch=n), SamplingParams(num_steps=reveal_steps),
                         generator=torch.Generator().manual_seed(1)).data[..., 0]
    counts = torch.bincount(out[:, 0] * 3 + out[:, 1], minlength=9).double()
    expected = table.flatten() / table.sum() * n
    assert chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_random_reveal_picks_masked_positions_uniformly():
    head = make("index", "none", block_size=4).output_head
    process = MaskedProcess(head, 12, "random", 0.0, 1e-3, 1.0, "elbo")
    rows = 4000
    masked = torch.ones(rows, 4, dtype=torch.bool)
    masked[:, 1] = False  # position 1 already revealed
    codes = torch.where(masked, 12, 0)
    state = BlockState(codes, masked, [2, 1, 0])  # step 0 reveals one of the three masked tokens
    out = process.step(state, torch.zeros(rows, 4, 32), None, SamplingParams(), 0, torch.Generator().manual_seed(0))
    revealed = masked & ~out.masked
    assert bool((revealed.sum(1) == 1).all()) and not bool(revealed[:, 1].any())
    assert bool((out.values[revealed] < 12).all()) and bool((out.values[out.masked] == 12).all())
    counts = revealed.sum(0)[[0, 2, 3]].double()
    assert chisquare(counts.numpy()).pvalue > 1e-3


# ------------------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("kind,reveal", [("index", "random"), ("index", "confidence"), ("diffusion", "random"),
                                         ("flow", "random")])
def test_same_seed_same_tokens_and_rows_depend_only_on_their_generator(kind, reveal):
    model = make(kind, "class", block_size=2, reveal=reveal)
    cond = cond_for("class", b=3)
    params = SamplingParams(num_steps=2, guidance_scale=2.0)
    a = model.generate(cond, params, generator=gens([5, 6, 7])).data
    b = model.generate(cond, params, generator=gens([5, 6, 7])).data
    c = model.generate(cond, params, generator=gens([8, 6, 7])).data
    alone = model.generate(Condition(labels=cond.labels[1:2]), params, generator=gens([6])).data
    single = model.generate(cond, params, generator=torch.Generator().manual_seed(5)).data
    again = model.generate(cond, params, generator=torch.Generator().manual_seed(5)).data
    assert torch.equal(a, b) and torch.equal(single, again)
    assert not torch.equal(a[0], c[0])
    if kind == "index":
        assert torch.equal(a[1:], c[1:]) and torch.equal(alone[0], a[1])
    else:
        assert (a[1:] - c[1:]).abs().max() <= 1e-5 and (alone[0] - a[1]).abs().max() <= 1e-5


def test_guidance_schedule_runs_over_all_blocks_and_steps():
    model = make("index", "class", block_size=4)
    values = [1.0, 2.0] * 4  # 4 blocks × 2 steps
    out = model.generate(cond_for("class", b=2), SamplingParams(num_steps=2, guidance_schedule=GuidanceSchedule.steps(
        values)), generator=torch.Generator().manual_seed(0))
    assert out.data.shape == (2, 16, 1)
    with pytest.raises(ValueError, match="4 × 2 = 8"):
        model.generate(cond_for("class", b=2), SamplingParams(num_steps=2, guidance_schedule=GuidanceSchedule.steps(
            [2.0] * 3)))


# ------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("kind", ["index", "flow"])
def test_save_load_round_trip(tmp_path, kind):
    model = make(kind, "class", block_size=4)
    model.save_pretrained(tmp_path)
    loaded = BlockDiffusion.from_pretrained(tmp_path).eval()
    assert loaded.config.block_size == 4 and loaded.spec == model.spec
    cond = cond_for("class")
    params = SamplingParams(num_steps=2, guidance_scale=1.5)
    a = model.generate(cond, params, generator=torch.Generator().manual_seed(0)).data
    b = loaded.generate(cond, params, generator=torch.Generator().manual_seed(0)).data
    assert torch.equal(a, b)
    tokens = Tokens(a, model.spec)
    la = model(tokens, cond, generator=torch.Generator().manual_seed(1))["loss"]
    lb = loaded(tokens, cond, generator=torch.Generator().manual_seed(1))["loss"]
    assert torch.equal(la, lb)


# ------------------------------------------------------------------------------------------------- training
def tiny_data(kind: str, n: int = 8):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    if kind == "index":  # one fixed sequence per class
        table = torch.randint(0, 12, (4, 16, 1), generator=g)
        return Tokens(table[labels], INDEX), labels
    table = torch.randn(4, 8, 3, generator=g)
    return Tokens(table[labels], CONT), labels


@pytest.mark.parametrize("kind,weighting,drop", [("index", "elbo", 0.15), ("index", "mean", 0.25),
                                                 ("diffusion", "elbo", 0.3), ("flow", "elbo", 0.25)])
def test_training_loss_goes_down_in_20_steps(kind, weighting, drop):
    """The mean loss on fixed noise draws, before and after 20 AdamW steps on 8 sequences (4 classes); measured
    drops (seeded): index elbo 2.26 → 2.04, index mean 2.48 → 2.12, diffusion 0.97 → 0.55, flow 2.05 → 1.73."""
    model = make(kind, "class", block_size=4, randomise=False, loss_weighting=weighting, cond_dropout=0.0)
    tokens, labels = tiny_data(kind)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            losses = [model(tokens, labels, generator=torch.Generator().manual_seed(100 + i))["loss"] for i in range(4)]
        return float(torch.stack(losses).mean())

    before = eval_loss()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        loss = model(tokens, labels, generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - drop, (before, after)


def test_forward_returns_logits_and_masked_loss_weighting():
    model = make("index", "class", block_size=4)
    tokens, labels = tiny_data("index", 4)
    out = model(tokens, labels, return_logits=True, generator=torch.Generator().manual_seed(0))
    assert out["logits"].shape == (4, 16, 1, 12) and out["z"].shape == (4, 16, 32)
    # elbo = sum over masked tokens of CE / t, divided by B·L: recompute it from the same draws
    process = model._process
    g = torch.Generator().manual_seed(0)
    noisy, _, info = process.noise(tokens.data[..., 0], 4, g)
    ce = torch.nn.functional.cross_entropy(out["logits"][..., 0, :][info["masked"]],
                                           tokens.data[..., 0][info["masked"]], reduction="none")
    want = (ce / info["t"][info["masked"]]).sum() / 64
    assert torch.allclose(out["loss"], want, atol=1e-5)
    assert 0.0 < float(info["t"].min()) and float(info["t"].max()) <= 1.0


# ------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    spec = INDEX.to_dict()
    with pytest.raises(ValueError, match=r"block_size=5 does not divide the sequence length L=16"):
        BlockDiffusion(token_spec=spec, block_size=5, width=32, depth=1, num_heads=4, num_classes=3)
    with pytest.raises(ValueError, match=r"num_steps=5 .*block_size=4"):
        BlockDiffusion(token_spec=spec, block_size=4, width=32, depth=1, num_heads=4, num_classes=3, num_steps=5)
    with pytest.raises(ValueError, match="head 'categorical'.*'continuous'"):
        BlockDiffusion(token_spec=CONT.to_dict(), block_size=4, width=32, depth=1, num_heads=4, num_classes=3)
    with pytest.raises(ValueError, match="head 'flow'.*kind='index'"):
        BlockDiffusion(token_spec=spec, block_size=4, width=32, depth=1, num_heads=4, num_classes=3, head="flow")
    bits = TokenSpec(kind="bits", bits=4, layout=Grid(2, 2))
    with pytest.raises(ValueError, match="head 'bitwise' for token_spec kind='bits'"):
        BlockDiffusion(token_spec=bits.to_dict(), block_size=2, width=32, depth=1, num_heads=4, num_classes=3,
                       head="bitwise")
    scales = TokenSpec(kind="index", vocab_size=8, layout=Scales(((1, 1), (2, 2))))
    with pytest.raises(ValueError, match="Grid or Sequence"):
        BlockDiffusion(token_spec=scales.to_dict(), block_size=1, width=32, depth=1, num_heads=4, num_classes=3)
    with pytest.raises(ValueError, match="reveal"):
        BlockDiffusion(token_spec=spec, block_size=4, width=32, depth=1, num_heads=4, num_classes=3, reveal="x")
    with pytest.raises(ValueError, match="mask_ratio_min"):
        BlockDiffusion(token_spec=spec, block_size=4, width=32, depth=1, num_heads=4, num_classes=3,
                       mask_ratio_min=0.0)

    model = make("index", "class", block_size=4)
    cond = cond_for("class", b=2)
    with pytest.raises(ValueError, match=r"num_steps=6 .*block_size=4"):
        model.generate(cond, SamplingParams(num_steps=6))
    with pytest.raises(ValueError, match="list of 2"):
        model.generate(cond, SamplingParams(num_steps=2), generator=gens([1]))
    with pytest.raises(ValueError, match="decoding"):
        model.generate(cond, decoding="jacobi")
    with pytest.raises(ValueError, match="per-row values"):
        model.generate(cond, SamplingParams(num_steps=2, temperature=torch.ones(3)))
    with pytest.raises(TypeError, match="conditioned on 'class'"):
        model.generate(Condition(batch=2))
    with pytest.raises(ValueError, match="does not match"):
        model(Tokens(torch.zeros(2, 8, 3), CONT), cond)
    with pytest.raises(ValueError, match="batch size"):
        model(Tokens(torch.zeros(3, 16, 1, dtype=torch.long), INDEX), cond)
    with pytest.raises(ValueError, match="holds 0 positions .* needs 5"):  # block 1 needs the prefix and block 0 cached
        model.cached_hidden(torch.zeros(2, 4, 32), 1, model.new_cache(2))
    unconditional = make("index", "none", block_size=4)
    with pytest.raises(ValueError, match="guidance needs a conditional generator"):
        unconditional.generate(Condition(batch=2), SamplingParams(num_steps=2, guidance_scale=2.0))
    flow = make("flow", "class", block_size=4)
    assert flow.generate(cond, SamplingParams(num_steps=7)).data.shape == (2, 8, 3)  # continuous: any steps
    with pytest.raises(ValueError, match="num_steps"):
        make("diffusion", "class", block_size=4).generate(cond, SamplingParams(num_steps=5000))


def test_registered_and_config_is_json():
    assert "block_diffusion" in generators.available()
    model = BlockDiffusion(token_spec=INDEX, block_size=16, width=32, depth=1, num_heads=4, num_classes=3)
    assert isinstance(model.config.token_spec, dict) and model.spec == INDEX
    assert model.default_num_steps == 16
    assert make("flow", "class", block_size=4).default_num_steps == 3


# ------------------------------------------------------------------------------------------------- recipe
def recipe() -> dict:
    import os

    import yaml

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "generator", "shapes_block_diffusion.yaml")) as f:
        return yaml.safe_load(f)


def test_recipe_builds_trains_a_step_and_generates_blocks_times_steps():
    cfg = dict(recipe()["generator"])
    spec = TokenSpec(kind="index", vocab_size=512, layout=Grid(8, 8))  # the recipe's VQ tokenizer
    model = generators.build(cfg.pop("name"), token_spec=spec.to_dict(), **cfg)
    tokens = Tokens(torch.randint(0, 512, (4, 64, 1)), spec)
    loss = model(tokens, torch.tensor([0, 5, 10, 20]), generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    calls = []
    handle = model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    out = model.generate(torch.tensor([3]), SamplingParams(guidance_scale=2.0), generator=gens([0]))
    handle.remove()
    assert out.data.shape == (1, 64, 1) and len(calls) == 8 * cfg["num_steps"]


def judge_acceptance(tokenizer, model, params: SamplingParams, per_class: int = 8) -> float:
    """Shapes-judge acceptance (shape and colour as asked) of ``per_class`` samples for each of the 21 classes."""
    import numpy as np

    from tokenloom.data.shapes import COLOR_NAMES, SHAPES
    from tokenloom.evaluation.shapes_judge import judge

    labels = torch.arange(21).repeat_interleave(per_class)
    with torch.no_grad():
        tokens = model.generate(labels, params, generator=gens(range(len(labels))))
        images = ((tokenizer.decode(tokens).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    ok = []
    for img, label in zip(images, labels.tolist()):
        shape, color = SHAPES[label // len(COLOR_NAMES)], COLOR_NAMES[label % len(COLOR_NAMES)]
        ok.append(judge(np.ascontiguousarray(img), {"include": [{"class": shape, "count": 1, "color": color}]})[0])
    return float(np.mean(ok))


@pytest.mark.slow
def test_shapes_block_diffusion_recipe_draws_the_requested_class():
    """Train configs/generator/shapes_block_diffusion.yaml (≤ 15 CPU minutes) and print the shapes-judge acceptance of
    class-conditional samples (8 blocks × 4 steps). Measured: 0.46 at guidance 3 after 800 generator steps with the
    recipe's tokenizer trained separately (``.venv/bin/python -m pytest -m slow tests/test_block_diffusion.py -s``)."""
    import time

    from tokenloom.training.generator_trainer import train_from_config

    start = time.time()
    result = train_from_config(recipe(), output_dir=None, progress=False)
    minutes = (time.time() - start) / 60
    tokenizer, model = result["tokenizer"].eval(), result["generator"].eval()
    acceptance = judge_acceptance(tokenizer, model, SamplingParams(guidance_scale=3.0))
    train = result["train"]
    print(f"block_diffusion shapes: judge acceptance {acceptance:.3f} (guidance 3, 8 blocks x 4 steps), final loss "
          f"{train['history'][-1]['loss']:.3f} after {train['steps']} steps, {minutes:.1f} min total")
    assert minutes <= 16 and acceptance >= 0.2
