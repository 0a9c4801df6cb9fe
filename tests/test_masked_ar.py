"""Masked AR (MAR): schedules, masking, generation contract, heads, training, save/load and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tokenloom import generators
from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.masked_ar import MaskedAR
from tokenloom.generators.masked_ar_layers import (
    mar_guidance_values,
    mar_mask_lengths,
    masked_after_steps,
    patchify,
    random_orders,
    sample_mask_ratio,
    unpatchify,
)
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

CONT = TokenSpec(kind="continuous", dim=4, layout=Grid(4, 4))
INDEX = TokenSpec(kind="index", vocab_size=12, layout=Grid(4, 4))
BITS = TokenSpec(kind="bits", bits=3, layout=Grid(3, 3))
HEAD_OPTIONS = {"diffusion": {"depth": 1, "mlp_width": 32, "num_sampling_steps": 8},
                "flow": {"depth": 1, "mlp_width": 32, "num_sampling_steps": 4}, "categorical": {}, "bitwise": {}}


def tiny(spec: TokenSpec = CONT, head: str = "diffusion", seed: int = 0, **kw) -> MaskedAR:
    torch.manual_seed(seed)
    args = dict(token_spec=spec.to_dict(), encoder_width=32, encoder_depth=1, encoder_num_heads=2, decoder_width=32,
                decoder_depth=1, decoder_num_heads=2, buffer_size=2, condition="class", num_classes=3,
                attn_dropout=0.0, proj_dropout=0.0, head=head, head_options=HEAD_OPTIONS[head])
    args.update(kw)
    return generators.build("masked_ar", **args).eval()


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


class CountingBackbone:
    """Wraps ``model.backbone``: counts calls and records the masks it sees."""

    def __init__(self, model: MaskedAR):
        self.inner, self.calls, self.masks = model.backbone, 0, []
        model.backbone = self

    def __call__(self, tokens, mask, buffer):
        self.calls += 1
        self.masks.append(mask.clone())
        return self.inner(tokens, mask, buffer)


# ---------------------------------------------------------------- schedules
def _mar_mask_lengths_by_hand(seq_len: int, num_iter: int) -> list[int]:
    """MAR's sample_tokens bookkeeping written out with torch tensors, as its loop does."""
    mask = torch.ones(1, seq_len)
    out = []
    for step in range(num_iter):
        ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = torch.tensor([np.floor(seq_len * ratio)], dtype=torch.float32)
        mask_len = torch.maximum(torch.tensor([1.0]), torch.minimum(mask.sum(-1, keepdim=True) - 1, mask_len))
        out.append(int(mask_len[0, 0]))
        mask = torch.zeros(1, seq_len)
        mask[:, :out[-1]] = 1
    return out


@pytest.mark.parametrize("seq_len", [1, 2, 5, 16, 17, 64, 256])
def test_mask_schedule_is_mars_and_reveals_every_position_once(seq_len):
    for steps in sorted({s for s in (1, 2, 3, seq_len // 4, seq_len // 2, seq_len) if 1 <= s <= seq_len}):
        lengths = mar_mask_lengths(seq_len, steps)
        assert lengths == _mar_mask_lengths_by_hand(seq_len, steps)
        left = masked_after_steps(seq_len, steps)
        revealed = [before - after for before, after in zip([seq_len] + left[:-1], left)]
        assert all(r >= 1 for r in revealed) and sum(revealed) == seq_len, (steps, revealed)
    assert mar_mask_lengths(256, 64)[:4] == [255, 254, 253, 252] and masked_after_steps(256, 64)[-1] == 0


def test_mar_guidance_ramp_values():
    values = mar_guidance_values(3.0, 16, 4)
    lengths = mar_mask_lengths(16, 4)
    assert values == [1 + 2.0 * (16 - m) / 16 for m in lengths]
    assert values[-1] == 1 + 2.0 * 15 / 16  # MAR's last step uses mask_len = 1, so the ramp stays below cfg
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="cfg must be"):
        mar_guidance_values(-1.0, 16, 4)


def test_training_mask_ratio_is_the_truncated_normal():
    g = torch.Generator().manual_seed(0)
    draws = np.array([sample_mask_ratio(0.7, 0.25, g) for _ in range(4000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    ref = stats.truncnorm((0.7 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25)
    assert stats.kstest(draws, ref.cdf).pvalue > 1e-3


def test_orders_are_uniform_permutations_and_per_row():
    g = torch.Generator().manual_seed(1)
    orders = torch.cat([random_orders(g, 500, 3, "cpu") for _ in range(6)])
    codes = (orders * torch.tensor([9, 3, 1])).sum(1)
    counts = torch.bincount(codes, minlength=27)[codes.unique()]
    assert len(counts) == 6 and stats.chisquare(counts.numpy()).pvalue > 1e-3
    a = random_orders(gens(1, 2, 3), 3, 16, "cpu")
    b = random_orders(gens(2), 1, 16, "cpu")
    assert torch.equal(a[1], b[0]) and not torch.equal(a[0], a[1])


def test_patchify_is_mars_layout_and_inverts():
    latent = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    x = patchify(latent, 2)
    assert x.shape == (2, 6, 12)
    # token (row 0, col 1) holds channel-major, then row offset, then column offset of its 2x2 patch
    assert x[0, 1].tolist() == latent[0, :, 0:2, 2:4].reshape(-1).tolist()
    assert torch.equal(unpatchify(x, 3, 2, 3, 2), latent)


# ---------------------------------------------------------------- the backbone
def test_training_mask_and_encoder_keep_buffer_and_visible_tokens():
    model = tiny()
    mask = model.random_mask(5, torch.Generator().manual_seed(0))
    counts = mask.sum(1)
    assert (counts == counts[0]).all() and counts[0] >= math.ceil(0.7 * 16)
    tokens = torch.randn(5, 16, 4)
    buf = model.buffer(Condition(labels=torch.tensor([0, 1, 2, 3, 0])))  # label 3 = the null class
    assert torch.equal(buf.x[3, 0], model.fake_latent[0]) and torch.equal(buf.x[0, 1], model.class_emb.weight[0])
    with torch.no_grad():
        enc = model.encode(tokens, mask, buf)
        assert enc.shape == (5, 2 + 16 - int(counts[0]), 32)
        z = model.decode(enc, mask)
        # masked tokens' values never reach the encoder
        z2 = model.decode(model.encode(torch.where(mask[..., None], torch.randn_like(tokens), tokens), mask, buf),
                          mask)
    assert z.shape == (5, 16, 32) and torch.equal(z, z2)
    with pytest.raises(ValueError, match="same number of positions"):
        model.encode(tokens, torch.eye(5, 16, dtype=torch.bool) | (torch.arange(16) < 3 * (torch.arange(5) == 0)
                                                                     [:, None]), buf)


def test_patched_tokens_round_trip_through_the_generator():
    spec = TokenSpec(kind="continuous", dim=2, layout=Grid(4, 6))
    model = tiny(spec, patch_size=2)
    assert model.seq_len == 6 and model.patch_spec.dim == 8
    data = torch.randn(2, 24, 2)
    x = model.to_patches(Tokens(data, spec))
    assert x.shape == (2, 6, 8) and torch.equal(model.from_patches(x), data)
    out = model.generate(torch.tensor([0, 1]), SamplingParams(num_steps=3), generator=gens(0, 1))
    assert out.spec == spec and out.data.shape == (2, 24, 2)


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("head,spec,reveal", [("diffusion", CONT, "order"), ("flow", CONT, "order"),
                                              ("categorical", INDEX, "order"), ("categorical", INDEX, "confidence"),
                                              ("bitwise", BITS, "confidence")])
def test_generation_contract(head, spec, reveal):
    """num_steps backbone passes (also with guidance); same seeds → same tokens; row i depends on generator i."""
    model = tiny(spec, head, reveal=reveal)
    params = SamplingParams(num_steps=4, guidance_scale=2.0, guidance_schedule=GuidanceSchedule.linear(start=1.0))
    counter = CountingBackbone(model)
    a = model.generate(torch.tensor([0, 1, 2]), params, generator=gens(5, 6, 7))
    assert counter.calls == 4 and a.spec == spec
    left = masked_after_steps(spec.length, 4)
    assert [int(m[0].sum()) for m in counter.masks] == [spec.length] + left[:-1]
    assert all((m[:3] == m[3:]).all() for m in counter.masks)  # the null rows share the conditional rows' mask
    b = model.generate(torch.tensor([0, 1, 2]), params, generator=gens(5, 6, 7))
    c = model.generate(torch.tensor([1]), params, generator=gens(6))
    assert torch.equal(a.data, b.data)
    assert torch.equal(a.data[1], c.data[0])
    assert not torch.equal(a.data[0], a.data[1])
    d = model.generate(torch.tensor([0, 1, 2]), params, generator=gens(8, 6, 7))
    assert torch.equal(a.data[1:], d.data[1:]) and not torch.equal(a.data[0], d.data[0])


def test_order_reveal_masks_are_nested_and_follow_the_schedule():
    model = tiny()
    counter = CountingBackbone(model)
    model.generate(torch.tensor([0, 1]), SamplingParams(num_steps=16), generator=gens(0, 1))
    masks = counter.masks + [torch.zeros_like(counter.masks[0])]
    assert counter.calls == 16
    for before, after in zip(masks, masks[1:]):
        assert not (after & ~before).any()  # a revealed token is never masked again
        assert ((before & ~after).sum(1) == 1).all()  # 16 steps over 16 tokens: one per step


def test_confidence_reveal_keeps_the_least_confident_masked():
    """Greedy sampling without Gumbel noise: after step 0 the positions left masked are those whose most likely code
    is least likely (MaskGIT), computed here from the first backbone pass."""
    model = tiny(INDEX, "categorical", reveal="confidence", remask_temperature=0.0)
    with torch.no_grad():
        model.output_head.proj.weight.normal_(0, 1.0)
    counter = CountingBackbone(model)
    model.generate(torch.tensor([0, 1]), SamplingParams(num_steps=4, temperature=0.0), generator=gens(0, 1))
    with torch.no_grad():
        z = model.backbone.inner(torch.zeros(2, 16, 1, dtype=torch.long), counter.masks[0],
                                 model.buffer(Condition(labels=torch.tensor([0, 1]))))
        best = model.output_head.logits(z.flatten(0, 1)).softmax(-1).amax(-1).view(2, 16)
    keep = masked_after_steps(16, 4)[0]
    expected = torch.zeros(2, 16, dtype=torch.bool).scatter_(1, best.argsort(1)[:, :keep], True)
    assert torch.equal(counter.masks[1], expected)


def test_text_condition_uses_the_buffer_and_padding():
    model = tiny(condition="text", cond_dim=6, cond_len=2, buffer_size=3)
    feats, mask = torch.randn(2, 2, 6), torch.tensor([[True, False], [True, True]])
    cond = Condition(features=feats, mask=mask)
    buf = model.buffer(cond, guided=True)
    assert buf.x.shape == (4, 3, 32) and buf.key_valid.shape == (4, 3)
    proj = model.text_prefix.proj(feats)
    assert torch.allclose(buf.x[0, 2], proj[0, 0]) and torch.allclose(buf.x[1, 2], proj[1].mean(0))
    with torch.no_grad():
        z1 = model.backbone(torch.zeros(2, 16, 4), torch.ones(2, 16, dtype=torch.bool), model.buffer(cond))
        feats2 = feats.clone()
        feats2[0, 1] = 100.0  # a padding token changes nothing
        z2 = model.backbone(torch.zeros(2, 16, 4), torch.ones(2, 16, dtype=torch.bool),
                            model.buffer(Condition(features=feats2, mask=mask)))
    assert torch.allclose(z1, z2, atol=1e-6)
    out = model.generate(cond, SamplingParams(num_steps=2, guidance_scale=1.5), generator=gens(0, 1))
    assert out.data.shape == (2, 16, 4)


def test_unconditional_generation_and_1d_layouts():
    model = tiny(condition="none", num_classes=None)
    out = model.generate(Condition(batch=2), SamplingParams(num_steps=2), generator=gens(0, 1))
    assert out.data.shape == (2, 16, 4) and torch.isfinite(out.data).all()
    seq = TokenSpec(kind="index", vocab_size=12, layout=Sequence(10))
    flex = tiny(seq, "categorical", condition="none", num_classes=None)
    assert flex.default_num_steps == 10
    assert flex.generate(Condition(batch=1), SamplingParams(num_steps=3)).spec == seq
    with pytest.raises(ValueError, match="guidance needs a conditional"):
        model.generate(Condition(batch=2), SamplingParams(num_steps=2, guidance_scale=2.0))


# ---------------------------------------------------------------- training and saving
def _structured_data(spec: TokenSpec, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 3
    if spec.kind == "continuous":
        base = torch.linspace(-1, 1, spec.length)[None, :, None] + labels[:, None, None].float()
        return base + 0.1 * torch.randn(n, spec.length, spec.dim, generator=g), labels
    codes = (torch.arange(spec.length)[None] + 4 * labels[:, None]) % spec.vocab_size
    return codes[..., None], labels


@pytest.mark.parametrize("head,spec", [("diffusion", CONT), ("categorical", INDEX), ("flow", CONT)])
def test_training_loss_goes_down_in_20_steps(head, spec):
    model = tiny(spec, head)
    data, labels = _structured_data(spec)
    tokens = Tokens(data, spec)
    fixed = torch.zeros(len(data), spec.length, dtype=torch.bool)
    fixed[:, :12] = True

    def held_out() -> float:  # a fixed mask and fixed head noise, so only the weights change
        model.eval()
        torch.manual_seed(123)
        with torch.no_grad():
            return float(model(tokens, labels, mask=fixed)["loss"])

    before = held_out()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(20):
        out = model(tokens, labels, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = held_out()
    assert after < 0.8 * before, (before, after)


def test_save_and_load_round_trip(tmp_path):
    model = tiny(INDEX, "categorical", reveal="confidence")
    model.save_pretrained(tmp_path)
    loaded = MaskedAR.from_pretrained(tmp_path).eval()
    assert loaded.config.reveal == "confidence" and loaded.spec == INDEX
    params = SamplingParams(num_steps=5, guidance_scale=1.5)
    a = model.generate(torch.tensor([0, 2]), params, generator=gens(3, 4))
    b = loaded.generate(torch.tensor([0, 2]), params, generator=gens(3, 4))
    assert torch.equal(a.data, b.data)
    cont = tiny()
    cont.save_pretrained(tmp_path / "c")
    again = MaskedAR.from_pretrained(tmp_path / "c").eval()
    mask = torch.arange(16).expand(2, 16) < 10
    x = Tokens(torch.randn(2, 16, 4), CONT)
    with torch.no_grad():
        torch.manual_seed(0)
        la = cont(x, torch.tensor([0, 1]), mask=mask)["loss"]
        torch.manual_seed(0)
        lb = again(x, torch.tensor([0, 1]), mask=mask)["loss"]
    assert torch.equal(la, lb)


# ---------------------------------------------------------------- bad input
def test_bad_construction_fails_naming_what_is_wrong():
    with pytest.raises(ValueError, match=r"head 'categorical' \(CategoricalHead\) models \('index',\) tokens but "
                                         r"token_spec has kind='continuous'"):
        tiny(CONT, "categorical")
    with pytest.raises(ValueError, match=r"head 'diffusion' .*'continuous'.* kind='index'"):
        tiny(INDEX, "diffusion")
    with pytest.raises(ValueError, match="reveal='confidence'.*diffusion"):
        tiny(CONT, reveal="confidence")
    with pytest.raises(ValueError, match="patch_size=3"):
        tiny(CONT, patch_size=3)
    with pytest.raises(ValueError, match=r"num_steps .* in \[1, 16\].*got 17"):
        tiny(CONT, num_steps=17)
    with pytest.raises(ValueError, match="buffer_size must be >= cond_len"):
        tiny(condition="text", cond_dim=4, cond_len=3, buffer_size=2)
    with pytest.raises(ValueError, match="encoder_width must be divisible by encoder_num_heads"):
        tiny(encoder_num_heads=5)
    with pytest.raises(ValueError, match="reveal must be one of"):
        tiny(reveal="random")


def test_bad_generation_input_fails_before_compute():
    model = tiny()
    counter = CountingBackbone(model)
    with pytest.raises(ValueError, match=r"num_steps .* in \[1, 16\].*got 17"):
        model.generate(torch.tensor([0]), SamplingParams(num_steps=17))
    with pytest.raises(ValueError, match="list of 2"):
        model.generate(torch.tensor([0, 1]), SamplingParams(num_steps=2), generator=gens(0))
    with pytest.raises(ValueError, match="GuidanceSchedule.values has 3 entries.*num_steps=4"):
        model.generate(torch.tensor([0]), SamplingParams(num_steps=4, guidance_schedule=GuidanceSchedule.steps(
            [1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match=r"cond.labels must lie in \[0, 2\]"):
        model.generate(torch.tensor([4]), SamplingParams(num_steps=2))
    with pytest.raises(TypeError, match="conditioned on 'class'"):
        model.generate(Condition(batch=1), SamplingParams(num_steps=2))
    with pytest.raises(ValueError, match="decoding must be None"):
        model.generate(torch.tensor([0]), SamplingParams(num_steps=2), decoding="jacobi")
    with pytest.raises(ValueError, match="per-row values"):
        model.generate(torch.tensor([0, 1]), SamplingParams(num_steps=2, temperature=torch.ones(3)))
    assert counter.calls == 0
    with pytest.raises(ValueError, match="spec"):
        model(Tokens(torch.randn(1, 16, 1).long().clamp(0, 5), INDEX), torch.tensor([0]))
    with pytest.raises(ValueError, match="at least one position"):
        model(Tokens(torch.randn(1, 16, 4), CONT), torch.tensor([0]), mask=torch.zeros(1, 16, dtype=torch.bool))
