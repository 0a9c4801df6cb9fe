"""CategoricalHead: logits layout, cross-entropy loss, sampling through the kernels (incl. guidance)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from tokenloom import heads, kernels
from tokenloom.config import SamplingParams
from tokenloom.heads.categorical import CategoricalHead
from tokenloom.tokens import Grid, Sequence, TokenSpec

SPEC = TokenSpec(kind="index", vocab_size=6, layout=Grid(2, 2))


def _head(seed: int = 0, bias: bool = False) -> CategoricalHead:
    torch.manual_seed(seed)
    head = heads.build("categorical", spec=SPEC, width=4, bias=bias)
    torch.nn.init.normal_(head.proj.weight)
    return head


def test_registered_and_shapes():
    assert "categorical" in heads.available()
    head = _head(bias=True)
    assert isinstance(head, CategoricalHead) and head.proj.bias is not None
    assert heads.build("categorical", spec=SPEC, width=4).proj.bias is None  # LlamaGen's `output` has no bias
    z = torch.randn(5, 4)
    logits = head.logits(z)
    assert logits.shape == (5, 1, 6) and logits.dtype == torch.float32
    torch.testing.assert_close(logits[:, 0], head.proj(z))


def test_loss_is_cross_entropy_per_position():
    head = _head()
    z, target = torch.randn(7, 4), torch.randint(0, 6, (7, 1))
    loss = head.loss(z, target)
    assert loss.shape == (7,)
    torch.testing.assert_close(loss, F.cross_entropy(head.proj(z), target[:, 0], reduction="none"))
    with pytest.raises(ValueError, match=r"target must have shape \(7, 1\)"):
        head.loss(z, target[:, 0])


@torch.no_grad()
def test_sample_distribution_chi_square_with_guidance():
    """Draws from one z follow softmax(uncond + s·(cond − uncond)) (20k draws, fixed seed)."""
    head = _head(3)
    z, zu = torch.randn(1, 4), torch.randn(1, 4)
    n, s = 20000, 2.5
    draws = head.sample(z.expand(n, -1), SamplingParams(guidance_scale=s), torch.Generator().manual_seed(0),
                        z_uncond=zu.expand(n, -1))
    assert draws.shape == (n, 1) and draws.dtype == torch.long
    cond, unc = head.proj(z)[0].double(), head.proj(zu)[0].double()
    probs = torch.softmax(unc + s * (cond - unc), -1)
    counts = torch.bincount(draws[:, 0], minlength=6).double()
    keep = probs * n >= 5
    expected = probs[keep] * n
    expected *= counts[keep].sum() / expected.sum()
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > 1e-3
    # without z_uncond there is no guidance: greedy equals the plain argmax
    greedy = head.sample(z, SamplingParams(temperature=0.0))
    assert int(greedy) == int(cond.argmax())


@torch.no_grad()
def test_sample_matches_kernels_with_same_generator():
    head = _head(1)
    z, zu = torch.randn(3, 4), torch.randn(3, 4)
    p = SamplingParams(top_k=3, guidance_scale=1.7)
    got = head.sample(z, p, torch.Generator().manual_seed(5), z_uncond=zu)
    want = kernels.sample(head.proj(z), p, torch.Generator().manual_seed(5), uncond_logits=head.proj(zu))
    assert torch.equal(got[:, 0], want)


def test_bad_specs_fail_clearly():
    with pytest.raises(NotImplementedError, match="depth=2"):
        CategoricalHead(TokenSpec(kind="index", vocab_size=6, depth=2, layout=Grid(2, 2)), 4)
    with pytest.raises(ValueError, match=r"models \('index',\) tokens but the TokenSpec has kind='bits'"):
        CategoricalHead(TokenSpec(kind="bits", bits=4, layout=Sequence(3)), 4)
