"""RandomOrderAR's schedules and orders: RandAR's decoding schedule, its guidance ramp, RAR's annealing, orders."""

from __future__ import annotations

import math

import pytest
import torch
from random_order_tiny import SPEC, L, make

from tokenloom.generators.random_order_layers import (
    generation_orders,
    permute_probability,
    randar_guidance_values,
    randar_tokens_per_step,
    training_orders,
)
from tokenloom.tokens import Tokens


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
