"""RandomOrderAR's cached decoding equals the full recomputation; the sequence is RandAR's."""

from __future__ import annotations

import pytest
import torch
from pipeline_tiny import randomize
from random_order_tiny import CSPEC, SPEC, L, cond_for, make, random_orders

from tokenloom.generators.condition import Condition
from tokenloom.tokens import Tokens


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
