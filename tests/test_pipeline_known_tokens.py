"""The generator side of editing: ``generate(..., known=, known_mask=)`` of masked AR and next-scale (the two added
for the pipelines; random-order AR's is tested in tests/test_random_order.py)."""

from __future__ import annotations

import pytest
import torch
from pipeline_tiny import randomize, seeded, tiny_msvq

from tokenloom import generators
from tokenloom.config import SamplingParams
from tokenloom.tokens import Grid, Tokens, TokenSpec

INDEX = TokenSpec(kind="index", vocab_size=12, layout=Grid(4, 4))
CONT = TokenSpec(kind="continuous", dim=2, layout=Grid(4, 4))


def masked(spec=INDEX, **kw):
    head = {"head": "categorical"} if spec.kind == "index" else \
        {"head": "diffusion", "head_options": {"depth": 1, "mlp_width": 16, "num_sampling_steps": 4}}
    torch.manual_seed(0)
    model = generators.build("masked_ar", token_spec=spec.to_dict(), encoder_width=32, encoder_depth=1,
                             encoder_num_heads=2, decoder_width=32, decoder_depth=1, decoder_num_heads=2,
                             buffer_size=2, condition="class", num_classes=3, attn_dropout=0.0, proj_dropout=0.0,
                             **head, **kw)
    return randomize(model) if spec.kind == "index" else model.eval()


def random_tokens(spec, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    if spec.kind == "index":
        return Tokens(torch.randint(0, spec.vocab_size, (b, spec.length, 1), generator=g), spec)
    return Tokens(torch.randn(b, spec.length, spec.channels, generator=g), spec)


def left_half(b, h=4, w=4):
    m = torch.zeros(b, h, w, dtype=torch.bool)
    m[:, :, : w // 2] = True
    return m.flatten(1)


class PassCounter:
    def __init__(self, model):
        self.inner, self.masks = model.backbone, []
        model.backbone = self

    def __call__(self, tokens, mask, buffer):
        self.masks.append(mask.clone())
        return self.inner(tokens, mask, buffer)


@pytest.mark.parametrize("reveal", ["order", "confidence"])
def test_masked_ar_starts_from_the_partial_mask_and_keeps_known_tokens(reveal):
    model = masked(reveal=reveal)
    known, km = random_tokens(INDEX, 2), left_half(2)
    counter = PassCounter(model)
    out = model.generate(torch.tensor([0, 2]), SamplingParams(num_steps=4), generator=seeded(0, 1), known=known,
                         known_mask=km)
    assert torch.equal(out.data[km], known.data[km])
    assert len(counter.masks) == 4 and torch.equal(counter.masks[0], ~km)  # first pass sees the known half
    for before, after in zip(counter.masks, counter.masks[1:]):
        assert not (after & ~before).any()  # masks only shrink
    # more steps than unknown positions: capped at their number (8), one reveal each
    counter.masks.clear()
    model.generate(torch.tensor([0, 2]), SamplingParams(num_steps=16), generator=seeded(0, 1), known=known,
                   known_mask=km)
    assert len(counter.masks) == 8


def test_masked_ar_patches_are_known_only_when_all_their_tokens_are():
    model = masked(CONT, patch_size=2)
    known = random_tokens(CONT, 1)
    km = torch.zeros(1, 16, dtype=torch.bool)
    km[0, [0, 1, 4, 5]] = True  # the top-left 2x2 patch
    km[0, 2] = True  # one token of the top-right patch: that patch is still generated
    counter = PassCounter(model)
    out = model.generate(torch.tensor([1]), SamplingParams(num_steps=2), generator=seeded(3), known=known,
                         known_mask=km)
    assert torch.equal(counter.masks[0], torch.tensor([[False, True, True, True]]))
    assert torch.equal(out.data[km], known.data[km])


def test_masked_ar_known_errors():
    model = masked()
    known = random_tokens(INDEX, 2)
    km = left_half(2)
    km[1, 0] = False
    with pytest.raises(ValueError, match="same number of unknown positions"):
        model.generate(torch.tensor([0, 1]), known=known, known_mask=km)
    with pytest.raises(ValueError, match="known and known_mask go together"):
        model.generate(torch.tensor([0, 1]), known=known)
    with pytest.raises(ValueError, match=r"known_mask must be a bool tensor of shape \[2, 16\]"):
        model.generate(torch.tensor([0, 1]), known=known, known_mask=left_half(2)[:, :8])
    everything = torch.ones(2, 16, dtype=torch.bool)
    assert torch.equal(model.generate(torch.tensor([0, 1]), known=known, known_mask=everything).data, known.data)


def test_next_scale_teacher_forces_known_tokens_at_every_scale():
    tok = tiny_msvq()
    torch.manual_seed(0)
    model = randomize(generators.build("next_scale", token_spec=tok.spec.to_dict(), input_dim=4, width=32, depth=2,
                                       num_heads=2, condition="class", num_classes=3)).bind_tokenizer(tok)
    known = random_tokens(tok.spec, 2)
    km = torch.rand(2, tok.spec.length, generator=torch.Generator().manual_seed(1)) < 0.5
    inputs = []
    inner = tok.next_input

    class Spy:  # records the codes each scale feeds forward
        spec = tok.spec

        def next_input(self, f_hat, k, codes):
            inputs.append(codes.clone())
            return inner(f_hat, k, codes)

        def teacher_inputs(self, tokens):
            return tok.teacher_inputs(tokens)

    model.bind_tokenizer(Spy())
    out = model.generate(torch.tensor([0, 1]), SamplingParams(), generator=seeded(0, 1), known=known,
                         known_mask=km)
    assert torch.equal(out.data[km], known.data[km])
    offsets = tok.spec.layout.offsets()
    for k, codes in enumerate(inputs):  # what fed scale k + 1 already held the known tokens of scale k
        assert torch.equal(codes, out.data[:, offsets[k]:offsets[k + 1]])
    free = model.generate(torch.tensor([0, 1]), SamplingParams(), generator=seeded(0, 1))
    assert not torch.equal(free.data, out.data)
    with pytest.raises(ValueError, match="known_mask must be a bool tensor"):
        model.generate(torch.tensor([0, 1]), known=known, known_mask=km.float())
