"""Decoders that must be exact: SJD (any window, both initialisations) and ZipAR (on a model that only reads its
allowed context) reproduce the known joint distribution of enumerable models — chi-square over >= 100,000 samples;
on the real generators SJD matches the enumerated joint of a tiny RasterAR / RandomOrderAR and ZipAR with a window
of a full row is raster decoding token for token."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from tokenloom import generators
from tokenloom.config import SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.decoding import SJD, ZipAR
from tokenloom.generators.decoding.toy import ToyGridTarget, ToyOrderedTarget, sequence_codes
from tokenloom.kernels import filtered_probs
from tokenloom.tokens import Grid, TokenSpec

N = 100_000


def chi2_p(codes: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of sample ``codes`` against ``probs``; cells expecting < 5 samples are pooled."""
    n = codes.numel()
    counts = torch.bincount(codes, minlength=probs.numel()).double()
    expected = probs.double() / probs.sum() * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    assert obs[~keep].sum() == 0, "samples where the target has no mass"
    obs, exp = obs[keep], exp[keep]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.parametrize("window,init,sharpness", [(4, "spatial", 2.5),
                                                   pytest.param(3, "random", 1.0, marks=pytest.mark.slow),
                                                   pytest.param(5, "random", 2.5, marks=pytest.mark.slow)])
def test_sjd_reproduces_the_toy_joint(window, init, sharpness):
    toy = ToyOrderedTarget(N, 4, 4, seed=window, sharpness=sharpness, grid=Grid(2, 2))
    sjd = SJD(window=window, init=init)
    tokens = sjd.run(toy, torch.Generator().manual_seed(1))
    assert chi2_p(sequence_codes(tokens, 4), toy.joint()) > 1e-3


def test_sjd_reproduces_the_truncated_joint_under_sampling_params():
    params = SamplingParams(temperature=0.7, top_k=3, top_p=0.95)
    toy = ToyOrderedTarget(N, 4, 4, seed=7, sharpness=1.5, params=params)
    tokens = SJD(window=3).run(toy, torch.Generator().manual_seed(2))
    joint = toy.joint(lambda logits: filtered_probs(logits, params))
    assert chi2_p(sequence_codes(tokens, 4), joint) > 1e-3


def test_sjd_is_seeded_and_takes_fewer_passes():
    """Same generators → same tokens; on a peaked model one row takes fewer passes than tokens.

    (Rows of a batch share the window, so a row's tokens depend on its generator *and* its batch-mates' progress;
    each row's distribution is exact either way.)"""
    def run():
        return SJD(window=4).run(ToyOrderedTarget(2, 6, 4, seed=3, sharpness=4.0),
                                 [torch.Generator().manual_seed(s) for s in (5, 6)])
    assert torch.equal(run(), run())
    passes = []
    for s in range(40):
        toy = ToyOrderedTarget(1, 6, 4, seed=3, sharpness=4.0)
        SJD(window=6).run(toy, torch.Generator().manual_seed(s))
        passes.append(toy.passes)
    assert max(passes) <= 6 and sum(passes) / len(passes) < 5.0


@pytest.mark.parametrize("window", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_zipar_reproduces_the_context_limited_joint(window):
    toy = ToyGridTarget(N, Grid(2, 3), 3, window=window, seed=window, sharpness=1.5)
    zipar = ZipAR(window=window)
    codes = zipar.run(toy, torch.Generator().manual_seed(3))
    assert chi2_p(sequence_codes(codes, 3), toy.joint()) > 1e-3
    # 2 x 3 grid: row 1 trails row 0 by `window` passes → 3 + window passes (plain raster: 6)
    assert toy.passes == 3 + window


class _ScheduleProbe:
    """A GridTarget with uniform logits that checks ZipAR's guaranteed context at every prediction."""

    def __init__(self, grid, window):
        self.batch_size, self.grid, self.length, self.vocab_size = 1, grid, grid.length, 2
        self.device, self.params, self.window, self.passes, self.targets = torch.device("cpu"), SamplingParams(), \
            window, 0, []

    def begin(self):
        self.passes += 1
        return torch.zeros(1, 1, 2), None

    def predict(self, targets, codes, decoded):
        w = self.grid.w
        for p in targets:
            r, c = divmod(p, w)
            need = [r * w + j for j in range(c)] + [q * w + j for q in range(r) for j in range(min(c + self.window, w))]
            assert bool(decoded[need].all()) and not bool(decoded[p])
        self.passes += 1
        self.targets.append(len(targets))
        return torch.zeros(1, len(targets), 2), None


@pytest.mark.parametrize("window", [1, 4, 8])
def test_zipar_schedule_and_pass_count(window):
    probe = _ScheduleProbe(Grid(8, 8), window)
    ZipAR(window=window).run(probe, torch.Generator().manual_seed(0))
    assert probe.passes == 8 + 7 * min(window, 8) and sum(probe.targets) == 63  # w + (h - 1)·W passes


# ---------------------------------------------------------------- real generators

def randomise(model, seed=0):
    """Random weights (the default init zeros the head, which would make every distribution uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 2 and "embedding" not in name and "null" not in name:
                p.copy_(2 * noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise)
    return model.eval()


SPEC = TokenSpec(kind="index", vocab_size=4, layout=Grid(2, 2))


def _all_sequences():
    return torch.tensor([[(c >> (2 * (3 - t))) & 3 for t in range(4)] for c in range(256)])


@torch.no_grad()
def test_sjd_on_raster_ar_matches_the_enumerated_joint():
    model = randomise(generators.build("raster_ar", token_spec=SPEC.to_dict(), width=16, depth=1, num_heads=2,
                                       multiple_of=16, num_classes=3))
    seqs = _all_sequences()
    params = SamplingParams(guidance_scale=1.5)
    logits = model.full_logits(torch.full((256,), 1), seqs[:, :3], guided=True)[:, :, 0]  # [512, 4, V]
    probs = torch.stack([filtered_probs(logits[:256, t], params, logits[256:, t]) for t in range(4)], 1)
    joint = probs.double().gather(2, seqs[..., None])[..., 0].prod(1)
    n = 20_000
    out = model.generate(torch.full((n,), 1), params, torch.Generator().manual_seed(0), decoding=SJD(window=3))
    assert chi2_p(sequence_codes(out.data[..., 0], 4), joint) > 1e-3


@torch.no_grad()
def test_sjd_on_random_order_ar_matches_the_enumerated_joint():
    model = randomise(generators.build("random_order_ar", token_spec=SPEC.to_dict(), width=16, depth=1,
                                       num_heads=2, multiple_of=16, num_classes=3), seed=1)
    order = torch.tensor([2, 0, 3, 1])
    seqs = _all_sequences()  # in generation order
    prefix = model.embed_prefix(Condition(labels=torch.full((256,), 2)), drop=False)
    cells = order.expand(256, -1)
    z = model.hidden(prefix, cells[:, :3], seqs[:, :3, None], cells[:, 3:])  # [256, 4, C]
    probs = torch.softmax(model.output_head.logits(z.flatten(0, 1))[:, 0].view(256, 4, -1).double(), -1)
    joint = probs.gather(2, seqs[..., None])[..., 0].prod(1)
    n = 20_000
    out = model.generate(torch.full((n,), 2), None, torch.Generator().manual_seed(0), decoding=SJD(window=4),
                         order=order.expand(n, -1))
    in_order = out.data[..., 0][:, order]
    assert chi2_p(sequence_codes(in_order, 4), joint) > 1e-3


@pytest.mark.parametrize("condition", ["class", "text"])
def test_zipar_with_a_full_row_window_is_raster_decoding(condition):
    spec = TokenSpec(kind="index", vocab_size=16, layout=Grid(3, 4))
    extra = {"num_classes": 3} if condition == "class" else {"cond_dim": 6, "cond_len": 3}
    model = randomise(generators.build("raster_ar", token_spec=spec.to_dict(), width=16, depth=2, num_heads=2,
                                       multiple_of=16, condition=condition, **extra))
    if condition == "class":
        cond = Condition(labels=torch.tensor([0, 1, 2]))
    else:
        mask = torch.ones(3, 3, dtype=torch.bool)
        mask[0, 2] = mask[2, 0] = False
        cond = Condition(features=torch.randn(3, 3, 6, generator=torch.Generator().manual_seed(0)), mask=mask)
    params = SamplingParams(guidance_scale=2.0, top_k=8)

    def gens():
        return [torch.Generator().manual_seed(s) for s in range(3)]

    plain = model.generate(cond, params, gens())
    zipar = ZipAR(window=4)
    assert torch.equal(model.generate(cond, params, gens(), decoding=zipar).data, plain.data)
    assert zipar.last_stats["forward_passes"] == 12
    narrow = ZipAR(window=2)
    out = model.generate(cond, params, gens(), decoding=narrow)
    assert out.data.shape == plain.data.shape and narrow.last_stats["forward_passes"] == 4 + 2 * 2
