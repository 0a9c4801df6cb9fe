"""RandomOrderAR.generate: the reference decoder, exact laws, passes per image, seeds, rows, inpainting."""

from __future__ import annotations

import pytest
import torch
from random_order_tiny import CSPEC, SPEC, L, count_passes, make, random_orders
from scipy.stats import chisquare

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.random_order_layers import per_token
from tokenloom.tokens import Grid, Tokens, TokenSpec


# ------------------------------------------------------------------ sampling follows the instruction tokens' logits
def reference_generate(model, cond, params, generator, orders, schedule):
    """Uncached decoder: one full recomputation per step, sampling the same way as ``generate``."""
    b = cond.batch_size
    guided = params.uses_guidance
    prefix = model.embed_prefix(cond, guided, drop=False)
    twice = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    values = torch.zeros(b, L, 1, dtype=torch.long)
    done = 0
    for s, k in enumerate(schedule):
        z = model.hidden(prefix, twice(orders[:, :done]), twice(values[:, :done]), twice(orders[:, done:done + k]))
        z = z[:, done:]
        p = params.at_step(s, len(schedule))
        p_tok, g_tok = per_token(p, generator, k)
        zu = z[b:].flatten(0, 1) if guided and p.guidance_scale != 1.0 else None
        drawn = model.output_head.sample(z[:b].flatten(0, 1), p_tok, g_tok, z_uncond=zu)
        values[:, done:done + k] = drawn.view(b, k, 1)
        done += k
    return torch.empty_like(values).scatter_(1, orders[..., None], values)


@pytest.mark.parametrize("schedule", [[1] * L, [1, 2, 3, 6], [L]])
@torch.no_grad()
def test_generation_equals_the_uncached_reference_decoder(schedule):
    model = make("class")
    labels, orders = torch.tensor([1, 3, 3]), random_orders(3, seed=5)
    params = SamplingParams(guidance_scale=2.5, top_k=12, temperature=torch.tensor([1.0, 0.7, 1.3]))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (4, 5, 6)]
    got = model.generate(labels, params, gens(), order=orders, tokens_per_step=schedule)
    want = reference_generate(model, Condition(labels=labels), params, gens(), orders, schedule)
    assert torch.equal(got.data, want)


@torch.no_grad()
def test_num_steps_equal_to_length_is_sequential_decoding():
    model = make("class")
    labels = torch.tensor([0, 4])
    p = SamplingParams(num_steps=L, guidance_scale=2.0)
    a = model.generate(labels, p, [torch.Generator().manual_seed(s) for s in (1, 2)])
    b = model.generate(labels, SamplingParams(guidance_scale=2.0), [torch.Generator().manual_seed(s) for s in (1, 2)],
                       tokens_per_step=[1] * L)
    assert torch.equal(a.data, b.data)


@torch.no_grad()
def test_greedy_guided_parallel_generation_follows_guided_logits_per_step():
    """temperature 0: each step's tokens are the argmax of uncond + s_t·(cond − uncond) of the full recomputation."""
    model = make("class")
    labels, orders, schedule = torch.tensor([1, 3]), random_orders(2, seed=1), [2, 3, 3, 4]
    scales = [0.0, 1.5, 3.0, 4.0]
    params = SamplingParams(temperature=0.0, guidance_schedule=GuidanceSchedule.steps(scales))
    tokens = model.generate(labels, params, order=orders, tokens_per_step=schedule).data
    in_order = tokens.gather(1, orders[..., None])
    prefix = model.embed_prefix(Condition(labels=labels), guided=True, drop=False)
    done = 0
    for s, k in enumerate(schedule):
        cat = lambda t: torch.cat([t, t])
        z = model.hidden(prefix, cat(orders[:, :done]), cat(in_order[:, :done]), cat(orders[:, done:done + k]))
        logits = model.output_head.logits(z[:, done:].flatten(0, 1)).view(4, k, 24)
        guided = logits[2:] + scales[s] * (logits[:2] - logits[2:])
        assert torch.equal(in_order[:, done:done + k, 0], guided.argmax(-1))
        done += k


@pytest.mark.parametrize("parallel", [False, True])
@torch.no_grad()
def test_exact_joint_distribution_of_two_positions(parallel):
    """Grid(1, 2), vocab 3, raster order: 6000 draws match the model's joint law (chi-square, fixed seeds).

    Sequential: p(x0)·p(x1 | x0) from the training forward; parallel (both in one step, RandAR): p(x0)·p'(x1) with both
    read from the two instruction tokens fed together."""
    spec = TokenSpec(kind="index", vocab_size=3, layout=Grid(1, 2))
    model = make("class", spec=spec, seed=3)
    n = 6000
    labels = torch.full((n,), 2)
    params = SamplingParams(temperature=0.8)
    torch.manual_seed(0)
    tokens = model.generate(labels, params, torch.Generator().manual_seed(1), order="raster",
                            tokens_per_step=[2] if parallel else [1, 1]).data[..., 0]
    prefix = model.embed_prefix(Condition(labels=labels[:3]), drop=False)
    cells0 = torch.zeros(3, 0, dtype=torch.long)
    if parallel:
        z = model.hidden(prefix, cells0, cells0[..., None], torch.tensor([[0, 1]] * 3))[:1]
        probs = (model.output_head.logits(z[0]) / 0.8).softmax(-1)[:, 0]  # [2, V]
        joint = probs[0][:, None] * probs[1][None, :]
    else:
        z0 = model.hidden(prefix, cells0, cells0[..., None], torch.tensor([[0]] * 3))[0]
        p0 = (model.output_head.logits(z0) / 0.8).softmax(-1)[0, 0]
        x0 = torch.arange(3)
        z1 = model.hidden(prefix, torch.zeros(3, 1, dtype=torch.long), x0[:, None, None], torch.ones(3, 1).long())
        p1 = (model.output_head.logits(z1[:, 1]) / 0.8).softmax(-1)[:, 0]  # [x0, V]
        joint = p0[:, None] * p1
    counts = torch.bincount(tokens[:, 0] * 3 + tokens[:, 1], minlength=9).double()
    expected = joint.flatten().double() * n
    assert expected.min() > 20  # a meaningful test: every cell is populated
    assert chisquare(counts.numpy(), expected.numpy() * counts.sum().item() / expected.sum().item()).pvalue > 1e-3
    # the parallel and sequential laws differ for this model, so the test tells them apart
    if parallel:
        z1 = model.hidden(prefix, torch.zeros(3, 1, dtype=torch.long), torch.arange(3)[:, None, None],
                          torch.ones(3, 1).long())
        p1 = (model.output_head.logits(z1[:, 1]) / 0.8).softmax(-1)[:, 0]
        assert (p1 - probs[1]).abs().max() > 0.02


# ------------------------------------------------------------------ forward passes, seeds, rows
@pytest.mark.parametrize("steps", [1, 3, 5, L])
@torch.no_grad()
def test_forward_passes_per_image_equal_num_steps(steps):
    model = make("class")
    calls = count_passes(model)
    tokens = model.generate(torch.tensor([0, 1]), SamplingParams(num_steps=steps, guidance_scale=2.0))
    assert len(calls) == steps and tokens.data.shape == (2, L, 1)
    calls.clear()
    known_mask = torch.zeros(2, L, dtype=torch.bool)
    known_mask[:, :4] = True
    model.generate(torch.tensor([0, 1]), SamplingParams(num_steps=steps), known=tokens, known_mask=known_mask)
    assert len(calls) == min(steps, L - 4)  # known tokens go into the first pass


@torch.no_grad()
def test_same_seed_same_tokens_and_progress_bar(capsys):
    model = make("class")
    p = SamplingParams(guidance_scale=2.0, top_k=10, num_steps=5)
    a = model.generate(torch.tensor([0, 1, 2]), p, torch.Generator().manual_seed(7), progress=True)
    b = model.generate(torch.tensor([0, 1, 2]), p, torch.Generator().manual_seed(7))
    c = model.generate(torch.tensor([0, 1, 2]), p, torch.Generator().manual_seed(8))
    assert torch.equal(a.data, b.data) and not torch.equal(a.data, c.data)
    assert "random_order_ar" in capsys.readouterr().err


@pytest.mark.parametrize("spec,guidance", [(SPEC, 1.0), (SPEC, 3.0), (CSPEC, 2.0)])
@torch.no_grad()
def test_per_row_generators_make_rows_independent(spec, guidance):
    model = make("class", spec=spec)
    labels, seeds = torch.tensor([4, 0, 2, 2]), [11, 12, 13, 14]
    temps = torch.tensor([1.0, 0.5, 1.0, 1.2])
    p = SamplingParams(guidance_scale=guidance, num_steps=4, temperature=temps)
    batch = model.generate(labels, p, [torch.Generator().manual_seed(s) for s in seeds])
    for i, s in enumerate(seeds):
        alone = model.generate(labels[i:i + 1], p.replace(temperature=temps[i:i + 1]),
                               [torch.Generator().manual_seed(s)])
        assert torch.equal(alone.data[0], batch.data[i])
    assert not torch.equal(batch.data[2], batch.data[3])  # same label, different seeds


# ------------------------------------------------------------------ inpainting
@pytest.mark.parametrize("spec", [SPEC, CSPEC])
@torch.no_grad()
def test_inpainting_keeps_known_tokens_unchanged(spec):
    model = make("class", spec=spec)
    source = model.generate(torch.tensor([0, 1, 2]), SamplingParams(num_steps=4), torch.Generator().manual_seed(0))
    known_mask = torch.rand(3, L, generator=torch.Generator().manual_seed(1)) < 0.5
    known_mask[0] = False
    known_mask[0, :2] = True  # rows with different numbers of known tokens
    out = model.generate(torch.tensor([0, 1, 2]), SamplingParams(num_steps=3, guidance_scale=2.0),
                         torch.Generator().manual_seed(2), known=source, known_mask=known_mask)
    assert torch.equal(out.data[known_mask], source.data[known_mask])
    assert not torch.equal(out.data[~known_mask], source.data[~known_mask])
    everything = torch.ones(3, L, dtype=torch.bool)
    assert torch.equal(model.generate(torch.tensor([0, 1, 2]), known=source, known_mask=everything).data, source.data)


@torch.no_grad()
def test_inpainting_conditions_on_known_tokens_first():
    """Greedy, one token per step: every generated token is the argmax given the known tokens and earlier ones."""
    model = make("class")
    source = Tokens(torch.randint(0, 24, (2, L, 1), generator=torch.Generator().manual_seed(0)), SPEC)
    known_mask = torch.zeros(2, L, dtype=torch.bool)
    known_mask[:, [0, 5, 6, 11]] = True  # an outpainting-like pattern
    base = random_orders(2, seed=4)
    out = model.generate(torch.tensor([1, 2]), SamplingParams(temperature=0.0), known=source, known_mask=known_mask,
                         order=base)
    orders = base.gather(1, (~known_mask).gather(1, base).long().argsort(dim=1, stable=True))
    logits = model(out, torch.tensor([1, 2]), orders=orders)["logits"][..., 0, :]
    unknown = ~known_mask
    assert torch.equal(out.data[..., 0][unknown], logits.argmax(-1)[unknown])
    free = model.generate(torch.tensor([1, 2]), SamplingParams(temperature=0.0), order=base)
    assert not torch.equal(free.data[unknown], out.data[unknown])  # the known tokens changed the rest
