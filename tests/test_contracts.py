"""The shape and sampling contracts: TokenSpec/Tokens/layouts, SamplingParams, GuidanceSchedule, registries."""

import math

import pytest
import torch

from tokenloom import GuidanceSchedule, SamplingParams
from tokenloom.generators.condition import Condition, as_condition
from tokenloom.registry import Registry
from tokenloom.tokens import Grid, Scales, Sequence, Tokens, TokenSpec


def test_layouts_lengths_and_positions():
    assert Grid(3, 4).length == 12
    assert Grid(2, 3).positions().tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    s = Scales(((1, 1), (2, 2), (3, 3)))
    assert s.length == 14 and s.offsets() == [0, 1, 5, 14]
    assert s.scale_of_position().tolist() == [0] + [1] * 4 + [2] * 9
    assert s.positions()[5].tolist() == [2, 0, 0]
    assert Sequence(7).positions().shape == (7, 1)


@pytest.mark.parametrize("bad", [lambda: Grid(0, 2), lambda: Grid(2, -1), lambda: Sequence(0),
                                 lambda: Scales(()), lambda: Scales(((1, 0),))])
def test_layouts_reject_bad_sizes(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("spec", [
    TokenSpec(kind="index", vocab_size=16, depth=2, layout=Grid(2, 2)),
    TokenSpec(kind="bits", bits=8, layout=Scales(((1, 1), (2, 2)))),
    TokenSpec(kind="continuous", dim=4, layout=Sequence(6)),
])
def test_spec_round_trips_through_dict(spec):
    assert TokenSpec.from_dict(spec.to_dict()) == spec
    import json

    assert TokenSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="pixels", layout=Grid(1, 1)), "kind"),
    (dict(kind="index", layout=Grid(1, 1)), "vocab_size"),
    (dict(kind="index", vocab_size=4, bits=3, layout=Grid(1, 1)), "bits"),
    (dict(kind="bits", bits=4, depth=2, layout=Grid(1, 1)), "depth"),
    (dict(kind="continuous", dim=0, layout=Grid(1, 1)), "dim"),
])
def test_spec_rejects_inconsistent_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TokenSpec(**kwargs)


def test_spec_rejects_non_layout():
    with pytest.raises(TypeError, match="layout"):
        TokenSpec(kind="index", vocab_size=4, layout=(2, 2))


def test_tokens_validate_shape_dtype_and_range():
    spec = TokenSpec(kind="index", vocab_size=8, layout=Grid(2, 2))
    Tokens(torch.randint(0, 8, (3, 4, 1)), spec)
    with pytest.raises(ValueError, match=r"\[B, 4, 1\]"):
        Tokens(torch.zeros(3, 5, 1, dtype=torch.long), spec)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        Tokens(torch.full((1, 4, 1), 8), spec)
    with pytest.raises(TypeError, match="integer"):
        Tokens(torch.zeros(1, 4, 1), spec)
    bits = TokenSpec(kind="bits", bits=3, layout=Sequence(5))
    Tokens(torch.randint(0, 2, (2, 3, 3)), bits)  # a prefix of a Sequence is allowed
    with pytest.raises(ValueError):
        Tokens(torch.full((2, 5, 3), 2), bits)
    cont = TokenSpec(kind="continuous", dim=2, layout=Grid(1, 2))
    with pytest.raises(TypeError, match="float"):
        Tokens(torch.zeros(1, 2, 2, dtype=torch.long), cont)


def test_tokens_indexing_keeps_batch_dim():
    spec = TokenSpec(kind="index", vocab_size=8, layout=Grid(2, 2))
    t = Tokens(torch.randint(0, 8, (3, 4, 1)), spec)
    assert t[1].data.shape == (1, 4, 1) and t[1:].batch_size == 2


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(min_p=1.2), ValueError, "min_p"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(guidance_schedule="linear"), TypeError, "guidance_schedule"),
    (dict(temperature=torch.tensor([[1.0]])), ValueError, "temperature"),
    (dict(top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k"),
])
def test_sampling_params_reject_bad_values(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_accept_per_row_tensors():
    p = SamplingParams(temperature=torch.tensor([0.5, 1.0]), top_k=torch.tensor([0, 3]))
    assert p.top_k.tolist() == [0, 3]


def test_guidance_schedules():
    assert GuidanceSchedule.constant().scale(4.0, 3, 10) == 4.0
    lin = GuidanceSchedule.linear(start=0.0)  # VAR: cfg * ratio
    assert [lin.scale(4.0, i, 5) for i in range(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    pc = GuidanceSchedule.power_cosine(power=2.0)
    assert pc.scale(5.0, 0, 3) == pytest.approx(1.0) and pc.scale(5.0, 2, 3) == pytest.approx(5.0)
    assert 1.0 < pc.scale(5.0, 1, 3) < 3.0  # power 2 keeps early steps near the start
    steps = GuidanceSchedule.steps([1.0, 2.0, 3.0])
    assert steps.scale(9.0, 1, 3) == 2.0
    with pytest.raises(ValueError, match="entries"):
        steps.scale(9.0, 1, 4)
    itv = GuidanceSchedule.interval(0.0, 0.5)
    assert [itv.scale(3.0, i, 5) for i in range(5)] == [3.0, 3.0, 3.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="low"):
        GuidanceSchedule.interval(0.6, 0.5)
    with pytest.raises(ValueError, match="kind"):
        GuidanceSchedule("cosine")
    p = SamplingParams(guidance_scale=4.0, guidance_schedule=lin).at_step(2, 5)
    assert p.guidance_scale == 2.0 and p.guidance_schedule.kind == "constant"


def test_uses_guidance():
    assert not SamplingParams().uses_guidance
    assert SamplingParams(guidance_scale=2.0).uses_guidance
    assert SamplingParams(guidance_schedule=GuidanceSchedule.steps([1.0, 3.0])).uses_guidance


def test_condition_forms():
    assert as_condition(torch.tensor([1, 2])).kind == "class"
    assert as_condition(torch.zeros(2, 3, 4)).kind == "text"
    assert as_condition(None, batch_size=3).batch_size == 3
    with pytest.raises(TypeError, match="cond"):
        as_condition("a red circle")
    with pytest.raises(ValueError, match="batch"):
        Condition()
    c = Condition(labels=torch.tensor([4, 5])).select(torch.tensor([0, 0, 1]))
    assert c.labels.tolist() == [4, 4, 5]


def test_registry_suggests_close_names():
    reg = Registry("tokenloom.heads", "head")

    @reg.register("categorical_x")
    class A:
        pass

    assert "categorical_x" in reg.available()
    with pytest.raises(ValueError, match="did you mean 'categorical_x'"):
        reg.get("categorical_y")
