"""RasterAR beyond one index code per cell: RVQ depth > 1 (RQ-Transformer depth transformer), 1D Sequence layouts
with prefix generation (FlexTok), bits and continuous tokens.

Checks: shapes; cached == full recomputation (spatial KV cache and the depth transformer's own cache, fp32 <= 1e-5);
the sampled distribution of a toy model (vocab 3, depth 3, two positions: 729 outcomes) equals the enumerated product
of its per-depth conditionals, with guidance, temperature and top-k (chi-square); greedy generation is the argmax of
the teacher-forced logits; training lowers the loss; save/load gives identical outputs; bad input errors.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from pipeline_tiny import randomize
from scipy import stats

from tokenloom import generators
from tokenloom.config import SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.depth_transformer import DepthTransformer
from tokenloom.generators.raster_ar import RasterAR
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

RVQ = TokenSpec(kind="index", vocab_size=7, depth=3, layout=Grid(2, 3))
SEQ = TokenSpec(kind="index", vocab_size=9, layout=Sequence(6))
BITS = TokenSpec(kind="bits", bits=4, layout=Grid(2, 2))
CONT = TokenSpec(kind="continuous", dim=3, layout=Sequence(4))
HEADS = {"index": "categorical", "bits": "bitwise", "continuous": "diffusion"}
HEAD_OPTIONS = {"diffusion": {"depth": 1, "mlp_width": 16, "num_sampling_steps": 3}}


randomise = randomize  # visible random weights (the default init zeroes the output layer)


def make(spec: TokenSpec = RVQ, condition: str = "class", seed: int = 0, random: bool = True, **kw) -> RasterAR:
    torch.manual_seed(seed)
    extra = {"class": {"num_classes": 4}, "text": {"cond_dim": 5, "cond_len": 3}, "none": {}}[condition]
    head = HEADS[spec.kind]
    model = generators.build("raster_ar", token_spec=spec.to_dict(), width=32, depth=2, num_heads=4, multiple_of=16,
                             condition=condition, head=head, head_options=HEAD_OPTIONS.get(head),
                             depth_layers=2, depth_heads=2, **{**extra, **kw})
    return randomise(model, seed) if random else model.eval()


def random_values(spec: TokenSpec, b: int, length: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    length = spec.length if length is None else length
    if spec.kind == "continuous":
        return torch.randn(b, length, spec.channels, generator=g)
    high = spec.vocab_size if spec.kind == "index" else 2
    return torch.randint(0, high, (b, length, spec.channels), generator=g)


def cached_z(model: RasterAR, cond, values: torch.Tensor, guided: bool = False) -> torch.Tensor:
    """Spatial outputs for positions 0..T through prefill + one-token cached steps."""
    prefix = model.embed_prefix(model.as_condition(cond), guided, drop=False)
    feed = torch.cat([values, values]) if guided else values
    cache = model.new_cache(prefix.x.shape[0])
    zs = [model.prefill(prefix, cache)[:, None]]
    for t in range(values.shape[1]):
        zs.append(model.step(feed[:, t:t + 1], cache))
    return torch.cat(zs, 1)


# ---------------------------------------------------------------- shapes and the cache


@torch.no_grad()
def test_depth_shapes_forward_and_generate():
    model = make()
    assert isinstance(model.depth_transformer, DepthTransformer) and model.output_head.spec.depth == 1
    tokens = Tokens(random_values(RVQ, 3), RVQ)
    out = model(tokens, torch.tensor([0, 1, 3]))
    assert out["logits"].shape == (3, RVQ.length, 3, 7) and out["loss"].dim() == 0
    gen = model.generate(torch.tensor([0, 2]), SamplingParams(guidance_scale=2.0), torch.Generator().manual_seed(0))
    assert gen.spec == RVQ and gen.data.shape == (2, RVQ.length, 3) and gen.data.dtype == torch.long
    assert make(SEQ).depth_transformer is None  # depth 1: no depth transformer


@pytest.mark.parametrize("spec,condition,guided", [(RVQ, "class", True), (RVQ, "text", False), (SEQ, "text", True),
                                                   (BITS, "class", True), (CONT, "none", False)])
@torch.no_grad()
def test_kv_cached_spatial_outputs_equal_full_recomputation(spec, condition, guided):
    model = make(spec, condition)
    g = torch.Generator().manual_seed(1)
    cond = (Condition(labels=torch.tensor([0, 3])) if condition == "class" else
            Condition(features=torch.randn(2, 3, 5, generator=g)) if condition == "text" else Condition(batch=2))
    values = random_values(spec, 2, spec.length - 1)
    prefix = model.embed_prefix(cond, guided, drop=False)
    full = model.hidden(prefix, torch.cat([values, values]) if guided else values)
    assert full.shape == (4 if guided else 2, spec.length, 32)
    assert (cached_z(model, cond, values, guided) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_depth_transformer_cache_equals_full_and_is_causal():
    dt = DepthTransformer(16, 4, num_layers=2, num_heads=2)
    torch.nn.init.normal_(dt.pos_embeddings)
    h, emb = torch.randn(5, 16), torch.randn(5, 4, 16)
    full = dt(h, emb)
    assert full.shape == (5, 4, 16)
    cache, running, outs = dt.new_cache(5), None, []
    for d in range(4):
        outs.append(dt.step(dt.input_at(d, h, running), cache))
        running = emb[:, d] if running is None else running + emb[:, d]  # cumsum
    assert (torch.stack(outs, 1) - full).abs().max() <= 1e-5
    # output d does not see code d or later (the last code embedding is never an input)
    emb2 = emb.clone()
    emb2[:, 2:] += 1.0
    changed = dt(h, emb2)
    torch.testing.assert_close(changed[:, :3], full[:, :3])
    assert (changed[:, 3] - full[:, 3]).abs().max() > 1e-3
    no_cumsum = DepthTransformer(16, 4, num_layers=1, num_heads=2, cumsum=False)
    torch.testing.assert_close(no_cumsum.inputs(h, emb)[:, 2], emb[:, 1] + no_cumsum.pos_embeddings[2])


@pytest.mark.parametrize("guidance", [1.0, 2.5])
@torch.no_grad()
def test_greedy_generation_is_the_argmax_of_teacher_forced_logits(guidance):
    """temperature 0: every code (each position, each depth) is the argmax of the full teacher-forced (guided)
    logits given the generated codes — the cached spatial and depth paths agree with the full ones."""
    model = make()
    labels = torch.tensor([1, 3, 0])
    tokens = model.generate(labels, SamplingParams(temperature=0.0, guidance_scale=guidance))
    cond_logits = model(tokens, labels)["logits"]
    null_logits = model(tokens, torch.full_like(labels, 4))["logits"]  # label 4 = the null class
    logits = null_logits + guidance * (cond_logits - null_logits)
    assert torch.equal(tokens.data, logits.argmax(-1))


# ---------------------------------------------------------------- exact distribution


TOY = TokenSpec(kind="index", vocab_size=3, depth=3, layout=Grid(1, 2))


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_k=2, guidance_scale=2.0)],
                         ids=["plain", "guided-topk"])
@torch.no_grad()
def test_sampled_distribution_equals_enumerated_factorisation(params):
    """729 outcomes (2 positions × 3 codes, vocab 3): sampled frequencies match prod_{t,d} p(c_{t,d} | ...), the
    product of the (guided, tempered, top-k-truncated) per-depth conditionals of the teacher-forced model."""
    torch.manual_seed(3)
    model = generators.build("raster_ar", token_spec=TOY.to_dict(), width=16, depth=1, num_heads=2, multiple_of=16,
                             num_classes=2, depth_layers=1, depth_heads=2)
    randomise(model, seed=3, scale=2.0)
    outcomes = torch.tensor(list(itertools.product(range(3), repeat=6))).view(729, 2, 3)
    label = torch.zeros(729, dtype=torch.long)
    logits = model(Tokens(outcomes, TOY), label)["logits"]  # [729, 2, 3, 3]
    if params.guidance_scale != 1.0:
        null = model(Tokens(outcomes, TOY), torch.full_like(label, 2))["logits"]
        logits = null + params.guidance_scale * (logits - null)
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    logp = logits.log_softmax(-1).gather(-1, outcomes[..., None])[..., 0].sum((1, 2))
    expected = logp.exp().double()
    assert abs(float(expected.sum()) - 1.0) < 1e-5

    n = 40000
    samples = model.generate(torch.zeros(n, dtype=torch.long), params, torch.Generator().manual_seed(11)).data
    index = (samples.view(n, 6) * 3 ** torch.arange(5, -1, -1)).sum(1)
    counts = torch.bincount(index, minlength=729).double()
    possible = expected > 0
    assert counts[~possible].sum() == 0  # top-k-excluded outcomes are never drawn
    exp_counts = expected[possible] * n
    big = exp_counts >= 5  # pool the rare cells into one
    obs = torch.cat([counts[possible][big], counts[possible][~big].sum()[None]])
    exp = torch.cat([exp_counts[big], exp_counts[~big].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    p_value = stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue
    assert p_value > 1e-3, p_value


# ---------------------------------------------------------------- training and save/load


def test_training_on_tiny_rvq_data_lowers_the_loss_and_greedy_samples_reproduce_it():
    torch.manual_seed(0)
    model = make(random=False, cond_dropout=0.0).train()
    targets = random_values(RVQ, 4, seed=5)  # one RVQ sequence per class
    labels = torch.arange(4).repeat(8)
    tokens = Tokens(targets[labels], RVQ)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(tokens, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]
    out = model.generate(torch.arange(4), SamplingParams(temperature=0.0))
    assert torch.equal(out.data, targets)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = make(condition="text")
    model.save_pretrained(tmp_path)
    loaded = RasterAR.from_pretrained(tmp_path).eval()
    assert loaded.spec == RVQ and loaded.config.depth_layers == 2
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    cond = Condition(features=torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)))
    tokens = Tokens(random_values(RVQ, 2), RVQ)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, cond)["logits"], model(tokens, cond)["logits"])
        p = SamplingParams(guidance_scale=2.0, top_k=4)
        assert torch.equal(loaded.generate(cond, p, torch.Generator().manual_seed(0)).data,
                           model.generate(cond, p, torch.Generator().manual_seed(0)).data)


# ---------------------------------------------------------------- Sequence prefixes (FlexTok)


@torch.no_grad()
def test_sequence_prefix_generation_and_prefix_training():
    model = make(SEQ, "class")
    p = SamplingParams(guidance_scale=1.5)
    full = model.generate(torch.tensor([0, 3]), p, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert full.data.shape == (2, 6, 1) and full.spec == SEQ
    for n in (1, 4, 6):
        prefix = model.generate(torch.tensor([0, 3]), p, [torch.Generator().manual_seed(s) for s in (1, 2)],
                                num_tokens=n)
        assert prefix.data.shape == (2, n, 1) and prefix.spec == SEQ
        assert torch.equal(prefix.data, full.data[:, :n])  # a prefix is the start of the full sequence
    # training on a prefix: the loss and logits of the first 3 tokens, as a causal model must give
    short = model(Tokens(full.data[:, :3], SEQ), torch.tensor([0, 3]))
    long = model(Tokens(full.data, SEQ), torch.tensor([0, 3]))
    assert short["logits"].shape == (2, 3, 1, 9)
    torch.testing.assert_close(short["logits"], long["logits"][:, :3])


@torch.no_grad()
def test_bits_and_continuous_tokens_generate_their_kind():
    bits = make(BITS).generate(torch.tensor([0, 1]), SamplingParams(guidance_scale=2.0))
    assert bits.spec == BITS and bits.data.shape == (2, 4, 4) and set(bits.data.unique().tolist()) <= {0, 1}
    cont_model = make(CONT, "none")
    cont = cont_model.generate(Condition(batch=2), num_tokens=3)
    assert cont.spec == CONT and cont.data.shape == (2, 3, 3) and cont.data.is_floating_point()
    assert torch.isfinite(cont_model(cont, Condition(batch=2))["loss"])


def test_bad_inputs_raise_clear_errors():
    model = make(SEQ, "class")
    with pytest.raises(ValueError, match=r"num_tokens must be None or an int in \[1, 6\].*got 7"):
        model.generate(torch.tensor([0]), num_tokens=7)
    with pytest.raises(ValueError, match=r"num_tokens must be None or an int in \[1, 6\].*got 0"):
        model.generate(torch.tensor([0]), num_tokens=0)
    with pytest.raises(ValueError, match="num_tokens must be None or 6 for a Grid layout"):
        make(RVQ).generate(torch.tensor([0]), num_tokens=3)
    with pytest.raises(ValueError, match="full_logits gives next-position logits"):
        make(RVQ).full_logits(torch.tensor([0]), torch.zeros(1, 2, 3, dtype=torch.long))
    rvq = make(RVQ)
    prefix = rvq.embed_prefix(Condition(labels=torch.tensor([0])))
    with pytest.raises(TypeError, match=r"codes must be a tensor \[B, T, 3\]"):
        rvq.hidden(prefix, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes values must lie in \[0, 6\], got \[9, 9\]"):
        rvq.hidden(prefix, torch.full((1, 1, 3), 9))
    with pytest.raises(ValueError, match="codes may hold at most 5 tokens"):
        rvq.hidden(prefix, torch.zeros(1, 6, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"SamplingParams.top_k has 3 per-row values but cond has 2 rows"):
        model.generate(torch.tensor([0, 1]), SamplingParams(top_k=torch.tensor([1, 2, 3])))
    with pytest.raises(ValueError, match=r"head 'diffusion' \(DiffusionHead\) models \('continuous',\) tokens"):
        generators.build("raster_ar", token_spec=RVQ.to_dict(), num_classes=3, head="diffusion")
