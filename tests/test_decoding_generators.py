"""generate(..., decoding=...) on the real generators: seeds, guidance/params, pass counts, and bad input."""

from __future__ import annotations

import pytest
import torch

from tokenloom import generators
from tokenloom.config import SamplingParams
from tokenloom.generators.decoding import LANTERN, SJD, GroupedSD, ZipAR
from tokenloom.tokens import Grid, Sequence, TokenSpec

SPEC = TokenSpec(kind="index", vocab_size=16, layout=Grid(3, 4))


def randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 2 and "embedding" not in name and "null" not in name:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise)
    return model.eval()


def make(kind="raster_ar", spec=SPEC, **kw):
    torch.manual_seed(0)
    return randomise(generators.build(kind, token_spec=spec.to_dict(), width=16, depth=1, num_heads=2,
                                      multiple_of=16, num_classes=3, **kw))


DECODERS = [SJD(window=4), SJD(window=3, init="spatial"), LANTERN(torch.randn(16, 3), k=3, delta=0.1, window=4),
            GroupedSD(delta=0.1, radius=2, window=4)]


@pytest.mark.parametrize("kind", ["raster_ar", "random_order_ar"])
@pytest.mark.parametrize("decoding", DECODERS, ids=repr)
def test_speculative_decoders_run_seeded_with_guidance_and_params(kind, decoding):
    model = make(kind)
    params = SamplingParams(guidance_scale=2.0, temperature=torch.tensor([1.0, 0.8]), top_k=6)

    def run():
        return model.generate(torch.tensor([0, 2]), params, [torch.Generator().manual_seed(s) for s in (1, 2)],
                              decoding=decoding)

    a = run()
    assert a.data.shape == (2, 12, 1) and a.spec == model.spec
    assert torch.equal(a.data, run().data)
    stats = decoding.last_stats
    assert 1 <= stats["forward_passes"] <= 12 and stats["tokens"] == 12


def test_sjd_window_one_takes_one_pass_per_token_and_model_mode_is_restored():
    model = make().train()
    sjd = SJD(window=1)
    model.generate(torch.tensor([1]), None, torch.Generator().manual_seed(0), decoding=sjd)
    assert sjd.last_stats["forward_passes"] == 12 and model.training


def test_sjd_on_a_sequence_layout_raster_model():
    model = make(spec=TokenSpec(kind="index", vocab_size=16, layout=Sequence(6)), rope_type="1d")
    out = model.generate(torch.tensor([0, 1]), None, torch.Generator().manual_seed(0),
                         decoding=SJD(window=3, init="spatial"))
    assert out.data.shape == (2, 6, 1)


def test_bad_settings_raise():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="window must be an int >= 1"):
            SJD(window=bad)
        with pytest.raises(ValueError, match="window must be an int >= 1"):
            ZipAR(window=bad)
    with pytest.raises(ValueError, match="init must be one of"):
        SJD(init="diagonal")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="delta must be a number in"):
            LANTERN(torch.randn(16, 3), delta=bad)
        with pytest.raises(ValueError, match="delta must be a number in"):
            GroupedSD(delta=bad)
    with pytest.raises(ValueError, match="k must be < the codebook size 16"):
        LANTERN(torch.randn(16, 3), k=16)
    with pytest.raises(ValueError, match=r"codebook must be a float tensor \[V, D\]"):
        LANTERN(torch.randn(16))
    with pytest.raises(ValueError, match="tolerance must be a number in"):
        GroupedSD(tolerance=2.0)


def test_decoding_given_to_a_generator_that_cannot_use_it_raises():
    raster, rand = make(), make("random_order_ar")
    with pytest.raises(TypeError, match="decoding must be None or a tokenloom.generators.decoding.Decoding"):
        raster.generate(torch.tensor([0]), decoding="sjd")
    with pytest.raises(ValueError, match=r"ZipAR\(window=4\) runs on generators \('raster_ar',\)"):
        rand.generate(torch.tensor([0]), decoding=ZipAR(4))
    with pytest.raises(ValueError, match="LANTERN's codebook has 8 codes but the generator's vocabulary has 16"):
        raster.generate(torch.tensor([0]), decoding=LANTERN(torch.randn(8, 2), k=2))
    with pytest.raises(ValueError, match="known/known_mask/tokens_per_step are not supported"):
        rand.generate(torch.tensor([0]), decoding=SJD(), tokens_per_step=[12])
    with pytest.raises(ValueError, match="order applies to random-order generators"):
        SJD().generate(raster, torch.tensor([0]), SamplingParams(), None, order="random")
    seq = make(spec=TokenSpec(kind="index", vocab_size=16, layout=Sequence(6)), rope_type="1d")
    with pytest.raises(ValueError, match="ZipAR needs a Grid layout"):
        seq.generate(torch.tensor([0]), decoding=ZipAR(2))
    with pytest.raises(ValueError, match="generator must be one torch.Generator or a list of 2"):
        raster.generate(torch.tensor([0, 1]), None, [torch.Generator()], decoding=SJD())
    cont = TokenSpec(kind="continuous", dim=4, layout=Grid(3, 4))
    model = make("random_order_ar", spec=cont, head="diffusion",
                 head_options={"depth": 1, "mlp_width": 16, "num_sampling_steps": 4})
    with pytest.raises(ValueError, match=r"needs 'index' tokens of depth 1.*kind='continuous'"):
        model.generate(torch.tensor([0]), decoding=SJD())
    with pytest.raises(ValueError, match="guidance needs a conditional generator"):
        generators.build("raster_ar", token_spec=SPEC.to_dict(), width=16, depth=1, num_heads=2, multiple_of=16,
                         condition="none").generate(generators.Condition(batch=1), SamplingParams(guidance_scale=2.0),
                                                    decoding=SJD())
