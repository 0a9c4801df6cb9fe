"""RandomOrderAR (RandAR / RAR): cached == full, parallel decoding, exact laws, inpainting, training, errors."""

from __future__ import annotations

import math

import pytest
import torch
from pipeline_tiny import randomize
from scipy.stats import chisquare

from tokenloom import generators
from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.random_order import RandomOrderAR
from tokenloom.generators.random_order_layers import (
    generation_orders,
    per_token,
    permute_probability,
    randar_guidance_values,
    randar_tokens_per_step,
    training_orders,
)
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

SPEC = TokenSpec(kind="index", vocab_size=24, layout=Grid(3, 4))
CSPEC = TokenSpec(kind="continuous", dim=4, layout=Grid(3, 4))
L = SPEC.length
DIFFUSION = {"depth": 1, "mlp_width": 32, "num_sampling_steps": 8, "clip_denoised": 3.0}




def make(condition: str = "class", seed: int = 0, spec: TokenSpec = SPEC, **kw) -> RandomOrderAR:
    torch.manual_seed(seed)
    extra = {"class": {"num_classes": 5}, "text": {"cond_dim": 6, "cond_len": 3}, "none": {}}[condition]
    if spec.kind == "continuous":
        extra = {**extra, "head": "diffusion", "head_options": DIFFUSION}
    model = generators.build("random_order_ar", token_spec=spec.to_dict(), width=32, depth=2, num_heads=4,
                             multiple_of=16, condition=condition, **{**extra, **kw})
    return randomize(model, seed) if spec.kind == "index" else model.eval()


def cond_for(condition: str, b: int = 3, seed: int = 0) -> Condition:
    g = torch.Generator().manual_seed(seed)
    if condition == "class":
        return Condition(labels=torch.randint(0, 5, (b,), generator=g))
    if condition == "text":
        mask = torch.ones(b, 3, dtype=torch.bool)
        mask[0, 2] = mask[-1, 0] = False  # padding, including a leading pad
        return Condition(features=torch.randn(b, 3, 6, generator=g), mask=mask)
    return Condition(batch=b)


def random_orders(b: int, seed: int = 0, length: int = L) -> torch.Tensor:
    return torch.rand(b, length, generator=torch.Generator().manual_seed(seed)).argsort(-1)


def count_passes(model) -> list[int]:
    """A list that grows by one per backbone pass (the final norm runs once per pass)."""
    calls: list[int] = []
    model.norm.register_forward_hook(lambda *args: calls.append(1))
    return calls


# ------------------------------------------------------------------ schedules and orders
def test_randar_schedule_takes_exactly_num_steps_and_covers_every_token():
    for length in range(1, 70):
        for steps in range(1, length + 1):
            counts = randar_tokens_per_step(length, steps)
            assert len(counts) == steps and sum(counts) == length and min(counts) >= 1, (length, steps)
    # RandAR's cosine: few tokens first, many last (256 tokens in 88 steps as in the paper)
    counts = randar_tokens_per_step(256, 88)
    assert counts[:20] == [1] * 20 and sum(counts[-10:]) >= 40
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 12\]"):
        randar_tokens_per_step(12, 13)


def test_randar_guidance_ramp_follows_decoded_fraction():
    assert randar_guidance_values(1.0, 5.0, [1, 1, 2], 4) == [1.0, 2.0, 3.0]


def test_rar_annealing_schedule_and_training_orders():
    assert [permute_probability(s, 10, 20) for s in (0, 10, 15, 20, 99)] == [1.0, 1.0, 0.5, 0.0, 0.0]
    assert permute_probability(10**6, None, None) == 1.0
    raster = torch.arange(L)
    torch.manual_seed(0)
    assert (training_orders(64, L, 0.0) == raster).all()
    orders = training_orders(4000, L, 0.3)
    assert torch.equal(orders.sort(1).values, raster.expand(4000, -1))  # permutations
    frac_random = (orders != raster).any(1).float().mean().item()
    assert abs(frac_random - 0.3 * (1 - 1 / math.factorial(L))) < 0.03


def test_model_anneals_with_its_training_step_counter():
    model = make("class", anneal_start=2, anneal_end=4)
    model.train()
    tokens, labels = Tokens(torch.randint(0, 24, (64, L, 1)), SPEC), torch.randint(0, 5, (64,))
    raster = torch.arange(L)
    fractions = []
    for _ in range(6):
        out = model(tokens, labels, return_logits=False)
        fractions.append((out["orders"] != raster).any(1).float().mean().item())
    assert fractions[:2] == [1.0, 1.0] and fractions[3] > 0 and fractions[4:] == [0.0, 0.0]
    assert model.training_step == 6 and model.permute_prob == 0.0
    model.set_training_progress(3)
    assert model.permute_prob == 0.5


def test_generation_orders_per_row_and_known_first():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    a = generation_orders(gens(), 3, L, "cpu")
    alone = generation_orders([torch.Generator().manual_seed(2)], 1, L, "cpu")
    assert torch.equal(a[1], alone[0])
    known = torch.rand(3, L, generator=torch.Generator().manual_seed(0)) < 0.4
    o = generation_orders(gens(), 3, L, "cpu", known_mask=known)
    for r in range(3):
        n = int(known[r].sum())
        assert known[r, o[r, :n]].all() and not known[r, o[r, n:]].any()
        # relative order kept: the unknown positions come in the same order as in the plain random order
        assert torch.equal(o[r, n:], a[r][~known[r, a[r]]])
    assert torch.equal(generation_orders(None, 2, L, "cpu", random=False), torch.arange(L).expand(2, -1))


# ------------------------------------------------------------------ cached == full
def cached_vs_full(model, cond, schedule, guided, seed=0):
    """Run prefill + steps over a fixed order and values; compare every step's query states to a full recomputation."""
    b = cond.batch_size
    orders, spec = random_orders(b, seed), model.spec
    if spec.kind == "index":
        values = torch.randint(0, spec.vocab_size, (b, L, 1), generator=torch.Generator().manual_seed(seed))
    else:
        values = torch.randn(b, L, spec.dim, generator=torch.Generator().manual_seed(seed))
    twice = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
    prefix = model.embed_prefix(cond, guided, drop=False)
    cache = model.new_cache(prefix.x.shape[0])
    worst, done, zs = 0.0, 0, []
    for s, k in enumerate(schedule):
        queries = twice(orders[:, done:done + k])
        if s == 0:
            z = model.prefill(prefix, cache, twice(orders[:, :0]), twice(values[:, :0]), queries)
        else:
            prev = schedule[s - 1]
            z = model.step(cache, twice(orders[:, done - prev:done]), twice(values[:, done - prev:done]), queries)
        full = model.hidden(prefix, twice(orders[:, :done]), twice(values[:, :done]), queries)[:, done:]
        worst = max(worst, (z - full).abs().max().item())
        zs.append(z)
        done += k
    return worst, torch.cat(zs, 1), orders, values


@pytest.mark.parametrize("condition,guided,kw", [
    ("class", False, {}), ("class", True, {}), ("text", True, {}), ("none", False, {}),
    ("class", True, {"instruction_embedding": "learned"}), ("text", True, {"num_kv_heads": 2}),
])
@torch.no_grad()
def test_cached_parallel_decoding_equals_full_recomputation(condition, guided, kw):
    model = make(condition, **kw)
    worst, _, _, _ = cached_vs_full(model, cond_for(condition), [1, 2, 3, 4, 2], guided)
    assert worst <= 1e-5


@pytest.mark.parametrize("condition,guided", [("class", True), ("text", True), ("none", False)])
@torch.no_grad()
def test_target_aware_rar_cached_equals_full(condition, guided):
    model = make(condition, order_signal="target_aware")
    worst, _, _, _ = cached_vs_full(model, cond_for(condition), [1] * L, guided)
    assert worst <= 1e-5


@torch.no_grad()
def test_continuous_tokens_cached_equals_full():
    worst, _, _, _ = cached_vs_full(randomize(make("class", spec=CSPEC)), cond_for("class"), [2, 5, 5], True)
    assert worst <= 1e-5


@pytest.mark.parametrize("order_signal", ["instruction", "target_aware"])
@torch.no_grad()
def test_one_token_per_step_cache_equals_the_training_forward(order_signal):
    """k = 1: the query states of cached decoding are the training forward's states at the instruction tokens."""
    model = make("text", order_signal=order_signal)
    cond = cond_for("text")
    worst, z_cached, orders, values = cached_vs_full(model, cond, [1] * L, guided=False)
    out = model(Tokens(values.gather(1, orders.argsort(1)[..., None]), SPEC), cond, orders=orders)
    logits_cached = model.output_head.logits(z_cached.flatten(0, 1)).view(3, L, 1, 24)
    in_order = out["logits"].gather(1, orders[:, :, None, None].expand(-1, -1, 1, 24))
    assert (logits_cached - in_order).abs().max() <= 1e-5


@torch.no_grad()
def test_sequence_layout_is_randars():
    """An independent build of RandAR's sequence: [prefix, I(o_1), x(o_1), ..., I(o_L)]; I(p) = the shared vector
    rotated per head by cell p's 2D RoPE; both I(p) and x(p) use cell p's RoPE; z at I(p) predicts x(p)."""
    from tokenloom.generators.layers.masks import causal_mask
    from tokenloom.generators.layers.rope import apply_rope, rope_table_2d

    model = make("class")
    labels, orders = torch.tensor([0, 3]), random_orders(2, seed=2)
    values = torch.randint(0, 24, (2, L, 1))
    table = rope_table_2d(3, 4, 8, 10000.0, 1, "zero")  # head_dim 8, one prefix row of zeros (LlamaGen)
    shared = model.pos_instruct_embeddings.view(4, 8)
    seq, rows = [model.prefix.embedding_table(labels)[:, None]], [table[:1].expand(2, 1, 4, 2)]
    for i in range(L):
        cell = table[1 + orders[:, i]]  # [2, 4, 2]
        seq.append(apply_rope(shared.expand(2, 1, 4, 8), cell[:, None]).flatten(2))
        rows.append(cell[:, None])
        if i < L - 1:
            seq.append(model.tok_embeddings(values[:, i]).view(2, 1, 32))
            rows.append(cell[:, None])
    x, rope = torch.cat(seq, 1), torch.cat(rows, 1)
    mask = causal_mask(x.shape[1])
    for layer in model.layers:
        x = layer(x, rope, mask)
    want = model.norm(x)[:, 1::2]  # the instruction tokens
    got = model.hidden(model.embed_prefix(Condition(labels=labels)), orders[:, :-1], values[:, :-1], orders[:, -1:])
    assert (got - want).abs().max() <= 1e-5


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


# ------------------------------------------------------------------ forward, save/load
@torch.no_grad()
def test_forward_logits_are_causal_in_the_order():
    model = make("class")
    codes, labels, orders = torch.randint(0, 24, (3, L, 1)), torch.tensor([0, 4, 2]), random_orders(3)
    out = model(Tokens(codes, SPEC), labels, orders=orders)
    ce = torch.nn.functional.cross_entropy(out["logits"].flatten(0, 2), codes.flatten())
    torch.testing.assert_close(out["loss"], ce)
    rows = torch.arange(3)
    last, first = orders[:, -1], orders[:, 0]
    changed = codes.clone()
    changed[rows, last] = (changed[rows, last] + 1) % 24  # the last token in the order is never an input
    torch.testing.assert_close(model(Tokens(changed, SPEC), labels, orders=orders)["logits"], out["logits"])
    changed = codes.clone()
    changed[rows, first] = (changed[rows, first] + 1) % 24  # the first one changes every later prediction only
    other = model(Tokens(changed, SPEC), labels, orders=orders)["logits"]
    torch.testing.assert_close(other[rows, first], out["logits"][rows, first])
    assert (other[rows, orders[:, 1]] - out["logits"][rows, orders[:, 1]]).abs().max() > 1e-3


@pytest.mark.parametrize("kw", [{"text_hidden": 8}, {"order_signal": "target_aware", "inference_order": "raster"}])
def test_save_load_round_trip(tmp_path, kw):
    model = make("text", **kw)
    model.save_pretrained(tmp_path)
    loaded = RandomOrderAR.from_pretrained(tmp_path).eval()
    assert loaded.spec == SPEC and loaded.config.order_signal == model.config.order_signal
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    cond = cond_for("text")
    with torch.no_grad():
        p = SamplingParams(guidance_scale=2.0)
        assert torch.equal(loaded.generate(cond, p, torch.Generator().manual_seed(0)).data,
                           model.generate(cond, p, torch.Generator().manual_seed(0)).data)


def test_config_accepts_a_tokenspec_and_sequence_layouts():
    model = generators.build("random_order_ar", token_spec=SPEC, width=16, depth=1, num_heads=2, num_classes=3)
    assert model.config.token_spec == SPEC.to_dict()
    assert model.output_head.proj.weight.abs().sum() == 0  # RandAR: the output layer starts at zero
    seq = TokenSpec(kind="index", vocab_size=8, layout=Sequence(6))
    m = generators.build("random_order_ar", token_spec=seq, width=16, depth=1, num_heads=2, condition="none")
    assert m.generate(Condition(batch=2), SamplingParams(num_steps=2)).data.shape == (2, 6, 1)


# ------------------------------------------------------------------ training
def tiny_data(spec: TokenSpec, n: int = 32):
    labels = torch.arange(n) % 5
    pos = torch.arange(L)
    if spec.kind == "index":
        return Tokens(((labels[:, None] * 3 + pos) % spec.vocab_size)[..., None], spec), labels
    if spec.kind == "bits":
        code = labels[:, None] * 3 + pos  # [n, L]
        return Tokens((code[..., None] >> torch.arange(spec.bits)) & 1, spec), labels
    g = torch.Generator().manual_seed(0)
    table = torch.randn(5, L, spec.dim, generator=g).clamp(-2, 2)
    return Tokens(table[labels], spec), labels


BSPEC = TokenSpec(kind="bits", bits=5, layout=Grid(3, 4))


@pytest.mark.parametrize("spec,head,options", [(SPEC, "categorical", {}), (CSPEC, "diffusion", DIFFUSION),
                                               (CSPEC, "flow", {"depth": 1, "mlp_width": 32}), (BSPEC, "bitwise", {})])
def test_training_loss_goes_down_in_20_steps(spec, head, options):
    """20 AdamW steps on 32 tiny sequences; the loss is compared on the same orders, noise and timesteps (seeded)."""
    torch.manual_seed(0)
    model = generators.build("random_order_ar", token_spec=spec.to_dict(), width=32, depth=2, num_heads=4,
                             multiple_of=16, num_classes=5, head=head, head_options=options)
    tokens, labels = tiny_data(spec)

    def eval_loss() -> float:
        model.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            loss = model(tokens, labels, return_logits=False)["loss"].item()
        model.train()
        return loss

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = eval_loss()
    for _ in range(20):
        loss = model(tokens, labels, return_logits=False)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    # measured after/before: categorical 0.67, diffusion 0.45, flow 0.80, bits 0.67
    assert after < 0.9 * before, (before, after)
    model.eval()
    with torch.no_grad():
        sample = model.generate(torch.tensor([0, 1]), SamplingParams(num_steps=4), torch.Generator().manual_seed(0))
    assert sample.spec == spec and torch.isfinite(sample.data.float()).all()


# ------------------------------------------------------------------ errors
def test_head_and_spec_mismatch_fails_at_construction_naming_both():
    with pytest.raises(ValueError, match=r"head 'categorical'.*kind='continuous'"):
        generators.build("random_order_ar", token_spec=CSPEC.to_dict(), width=16, depth=1, num_heads=2,
                         num_classes=3)
    with pytest.raises(ValueError, match=r"head 'diffusion'.*kind='index'"):
        generators.build("random_order_ar", token_spec=SPEC.to_dict(), width=16, depth=1, num_heads=2,
                         num_classes=3, head="diffusion")


def test_bad_inputs_raise_clear_errors():
    model = make("class")
    labels = torch.tensor([0, 1])
    source = Tokens(torch.randint(0, 24, (2, L, 1)), SPEC)
    with pytest.raises(ValueError, match=r"tokens_per_step must be positive ints summing to the 12"):
        model.generate(labels, tokens_per_step=[6, 7])
    with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, 12\]"):
        model.generate(labels, SamplingParams(num_steps=13))
    with pytest.raises(ValueError, match=r"layout holds 12 tokens; cannot place 13"):
        prefix = model.embed_prefix(Condition(labels=labels))
        model.hidden(prefix, random_orders(2)[:, :10], torch.zeros(2, 10, 1).long(), torch.zeros(2, 3).long())
    with pytest.raises(ValueError, match=r"known_mask must be a bool tensor of shape \[2, 12\]"):
        model.generate(labels, known=source, known_mask=torch.ones(2, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"known_mask must be a bool tensor"):
        model.generate(labels, known=source, known_mask=torch.ones(2, L))
    with pytest.raises(ValueError, match="known and known_mask go together"):
        model.generate(labels, known=source)
    with pytest.raises(ValueError, match="orders must hold a permutation"):
        model(source, labels, orders=torch.zeros(2, L).long())
    with pytest.raises(TypeError, match="decoding must be None or a tokenloom.generators.decoding.Decoding"):
        model.generate(labels, decoding="jacobi")
    with pytest.raises(ValueError, match="pending query positions"):
        cache = model.new_cache(2)
        model.prefill(model.embed_prefix(Condition(labels=labels)), cache, queries=torch.tensor([[0], [1]]))
        model.step(cache, torch.tensor([[1], [1]]), torch.zeros(2, 1, 1).long())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        model.generate(torch.tensor([-1]))
    rar = make("class", order_signal="target_aware")
    with pytest.raises(ValueError, match="one token per step"):
        rar.generate(labels, SamplingParams(num_steps=4))
    with pytest.raises(ValueError, match="anneal_start and anneal_end"):
        make("class", anneal_start=5)
    with pytest.raises(ValueError, match=r"num_steps must be None or an int in \[1, 12\]"):
        make("class", num_steps=20)


# ------------------------------------------------------------------ recipe (slow measurement)
def judge_rate(images: torch.Tensor, labels: list[int], with_color: bool = True) -> float:
    """Fraction of ``images [N, 3, 32, 32]`` in [-1, 1] the shapes judge accepts as their class (shape, and colour)."""
    import numpy as np

    from tokenloom.data.shapes import COLOR_NAMES, SHAPES
    from tokenloom.evaluation.shapes_judge import judge

    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    ok = []
    for img, label in zip(u8, labels):
        want = {"class": SHAPES[label // len(COLOR_NAMES)], "count": 1}
        if with_color:
            want["color"] = COLOR_NAMES[label % len(COLOR_NAMES)]
        ok.append(judge(np.ascontiguousarray(img), {"include": [want]})[0])
    return float(np.mean(ok))


def recipe_report(tokenizer, model, params: SamplingParams, per_class: int = 8) -> dict:
    """Judge acceptance of class-conditional samples next to the tokenizer's ceiling (reconstructions of real test
    images) and a control (samples judged against another shape), with and without colour."""
    from tokenloom.data.shapes import SingleShapeDataset

    data = SingleShapeDataset("test", image_size=32, num_samples=21 * per_class, seed=0)
    real = torch.stack([data[i]["image"] for i in range(len(data))])
    real_labels = [data[i]["label"] for i in range(len(data))]
    labels = torch.arange(21).repeat_interleave(per_class)
    with torch.no_grad():
        recon = tokenizer.decode(tokenizer.encode(real))
        gens = [torch.Generator().manual_seed(i) for i in range(len(labels))]
        tokens = model.generate(labels, params, generator=gens)
        images = tokenizer.decode(tokens)
    shifted = ((labels + 7) % 21).tolist()  # same colour, the next shape
    return {"samples": judge_rate(images, labels.tolist()), "reconstructions": judge_rate(recon, real_labels),
            "samples_shape": judge_rate(images, labels.tolist(), False),
            "reconstructions_shape": judge_rate(recon, real_labels, False),
            "control_shape": judge_rate(images, shifted, False)}


@pytest.mark.slow
def test_shapes_random_order_recipe_draws_the_requested_class():
    """Train configs/generator/shapes_random_order.yaml and print the shapes-judge acceptance of class-conditional
    samples (RandAR parallel decoding, 16 steps for 64 tokens, guidance 3) next to the tokenizer's ceiling.

    Measured on a loaded 2-core machine with ``--set tokenizer.recipe.train.max_minutes=30
    --set train.max_minutes=45 --set train.batch_size=32`` (tokenizer 927 steps / 4.8 CPU-min, generator 2190
    steps): samples 0.13 vs reconstructions 0.17; shape only 0.52 vs 0.60, control 0.01."""
    import os
    import time

    import yaml

    from tokenloom.training.generator_trainer import train_from_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "configs", "generator", "shapes_random_order.yaml")) as f:
        cfg = yaml.safe_load(f)
    start = time.time()
    result = train_from_config(cfg, output_dir=None, progress=False)
    minutes = (time.time() - start) / 60
    tokenizer, model = result["tokenizer"].eval(), result["generator"].eval()
    report = recipe_report(tokenizer, model, SamplingParams(guidance_scale=3.0, num_steps=16))
    train = result["train"]
    print(f"random_order shapes: {report}; final loss {train['history'][-1]['loss']:.3f} after {train['steps']} steps, "
          f"{minutes:.1f} min total")
    # the generator reaches most of what its tokenizer can show, and draws the shape it is asked for
    assert report["samples_shape"] >= 0.5 * report["reconstructions_shape"]
    assert report["samples_shape"] >= 5 * report["control_shape"] + 0.05
