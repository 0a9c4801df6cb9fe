"""Bitwise head (Infinity): logits layout, loss = binary cross entropy, exact per-bit sampling distribution."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from tokenloom import heads
from tokenloom.config import SamplingParams
from tokenloom.heads.bitwise import BitwiseHead
from tokenloom.tokens import Grid, Scales, TokenSpec

SPEC = TokenSpec(kind="bits", bits=3, layout=Scales(((1, 1), (2, 2))))


def make() -> BitwiseHead:
    torch.manual_seed(0)
    head = heads.build("bitwise", spec=SPEC, width=8)
    with torch.no_grad():
        head.proj.weight.normal_()
        head.proj.bias.normal_()
    return head


def test_logits_layout_and_loss_is_mean_binary_cross_entropy():
    head = make()
    z = torch.randn(5, 8)
    logits = head.logits(z)
    assert logits.shape == (5, 3, 2) and logits.dtype == torch.float32
    flat = head.proj(z)
    assert torch.equal(logits[:, 1], flat[:, 2:4])  # bit j ↔ features (2j, 2j+1)
    target = torch.randint(0, 2, (5, 3))
    margin = logits[..., 1] - logits[..., 0]  # log-odds of bit = 1
    want = F.binary_cross_entropy_with_logits(margin, target.float(), reduction="none").mean(-1)
    torch.testing.assert_close(head.loss(z, target), want)
    with pytest.raises(ValueError, match=r"\[N, bits\]"):
        head.loss(z, target[:, :2])


def test_rejects_non_bit_specs():
    index = TokenSpec(kind="index", vocab_size=4, layout=Grid(2, 2))
    with pytest.raises(ValueError, match=r"models \('bits',\) tokens but the TokenSpec has kind='index'"):
        BitwiseHead(index, 8)


def test_sampled_bits_follow_the_guided_tempered_distribution():
    """Chi-square over the 8 joint outcomes of 3 independent bits, with guidance and temperature."""
    head = make()
    n = 4000
    logits = torch.tensor([[0.3, -0.4], [1.2, 0.1], [-0.5, 0.5]]).expand(n, 3, 2).contiguous()
    uncond = torch.tensor([[0.0, 0.0], [0.8, 0.3], [0.2, -0.1]]).expand(n, 3, 2).contiguous()
    params = SamplingParams(temperature=0.7, guidance_scale=1.5, top_k=900)  # top_k >= 2 is off for bits
    bits = head.sample_logits(logits, params, torch.Generator().manual_seed(0), uncond_logits=uncond)
    assert bits.shape == (n, 3) and set(bits.unique().tolist()) <= {0, 1}
    guided = (uncond + 1.5 * (logits - uncond))[0] / 0.7
    p1 = guided.softmax(-1)[:, 1].double()  # P(bit = 1) per bit
    outcome = (bits * torch.tensor([4, 2, 1])).sum(-1)
    observed = torch.bincount(outcome, minlength=8).double()
    combos = torch.tensor([[(o >> 2) & 1, (o >> 1) & 1, o & 1] for o in range(8)]).double()
    expected = torch.prod(torch.where(combos == 1, p1, 1 - p1), dim=-1) * n
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    # a wrong distribution (no guidance) is rejected by the same test
    plain = (logits[0] / 0.7).softmax(-1)[:, 1].double()
    wrong = torch.prod(torch.where(combos == 1, plain, 1 - plain), dim=-1) * n
    assert chisquare(observed.numpy(), wrong.numpy()).pvalue < 1e-3


def test_greedy_top_p_and_per_row_generators():
    head = make()
    z = torch.randn(4, 8)
    margin = head.logits(z)[..., 1] - head.logits(z)[..., 0]
    assert torch.equal(head.sample(z, SamplingParams(temperature=0.0)), (margin > 0).long())
    tiny_p = head.sample(z, SamplingParams(top_p=1e-6), torch.Generator().manual_seed(1))
    assert torch.equal(tiny_p, (margin > 0).long())  # top-p keeps only the likelier outcome of each bit
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11, 12, 13)]
    batch = head.sample(z, SamplingParams(), gens())
    alone = head.sample(z[2:3], SamplingParams(), [torch.Generator().manual_seed(12)])
    assert torch.equal(batch[2:3], alone)
    per_row = SamplingParams(temperature=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    out = head.sample(z, per_row, gens())
    assert torch.equal(out[0], (margin[0] > 0).long()) and torch.equal(out[2], (margin[2] > 0).long())
