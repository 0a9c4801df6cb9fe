"""The tokenizer contract for RVQ, multi-scale VQ, LFQ, BSQ, multi-scale BSQ and FSQ, on tiny configs.

Each tokenizer: decode(encode(x)) has x's shape; the spec says what the tokens are (kind, vocab/bits, depth,
layout); save → load gives identical encodings; one training step gives a finite loss and encoder gradients;
bad images and bad tokens raise clear errors before compute.
"""

import pytest
import torch

from tokenloom.tokenizers import available, build
from tokenloom.tokens import Grid, Scales, Tokens, TokenSpec

TINY = dict(image_size=8, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4)
CONFIGS = {
    "rvq": dict(depth=3, codebook_size=16, codebook_dim=4, quantizer_dropout=0.5, dead_code_threshold=0.1),
    "msvq": dict(codebook_size=16, codebook_dim=4, scales=[1, 2, 4]),
    "lfq": dict(bits=5),
    "bsq": dict(bits=5),
    "msbsq": dict(bits=5, scales=[1, 2, 4]),
    "fsq": dict(levels=[5, 3, 3]),
}
NAMES = sorted(CONFIGS)


def make(name, seed=0, **overrides):
    torch.manual_seed(seed)
    return build(name, **{**TINY, **CONFIGS[name], **overrides})


def images(batch=2, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


def expected_spec(name):
    if name == "rvq":
        return TokenSpec(kind="index", vocab_size=16, depth=3, layout=Grid(4, 4))
    if name == "msvq":
        return TokenSpec(kind="index", vocab_size=16, layout=Scales(((1, 1), (2, 2), (4, 4))))
    if name in ("lfq", "bsq"):
        return TokenSpec(kind="bits", bits=5, layout=Grid(4, 4))
    if name == "msbsq":
        return TokenSpec(kind="bits", bits=5, layout=Scales(((1, 1), (2, 2), (4, 4))))
    return TokenSpec(kind="index", vocab_size=45, layout=Grid(4, 4))


def test_all_registered():
    assert set(NAMES) <= set(available())


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_shape_and_honest_spec(name):
    tok = make(name).eval()
    x = images()
    tokens = tok.encode(x)
    assert tok.spec == expected_spec(name) == tokens.spec
    assert tokens.data.shape == (2, tok.spec.length, tok.spec.channels) and tokens.data.dtype == torch.long
    high = tok.spec.vocab_size if tok.spec.kind == "index" else 2
    assert 0 <= int(tokens.data.min()) and int(tokens.data.max()) < high
    with torch.no_grad():
        y = tok.decode(tokens)
        emb = tok.embed(tokens)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert emb.shape[:2] == (2, tok.spec.length) and torch.isfinite(emb).all()
    # The tokens carry the image: decoding other tokens gives another image.
    other = Tokens(torch.roll(tokens.data, 1, dims=0), tokens.spec)
    with torch.no_grad():
        assert not torch.allclose(tok.decode(other), y)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_identical_encodings(name, tmp_path):
    tok = make(name).eval()
    x = images()
    tok.save_pretrained(tmp_path)
    loaded = type(tok).from_pretrained(tmp_path).eval()
    assert loaded.spec == tok.spec
    a, b = tok.encode(x), loaded.encode(x)
    assert torch.equal(a.data, b.data)
    with torch.no_grad():
        assert torch.equal(tok.decode(a), loaded.decode(b))
    # Same seed, same model.
    assert torch.equal(make(name).encode(x).data, a.data)


@pytest.mark.parametrize("name", NAMES)
def test_training_step(name):
    tok = make(name).train()
    out = tok(images(batch=4))
    assert out["recon"].shape == (4, 3, 8, 8)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grad = tok.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert tok.decoder.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bad_images(name):
    tok = make(name)
    with pytest.raises(ValueError, match="shape"):
        tok.encode(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 9, 9))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tok.encode(torch.full((1, 3, 8, 8), 1.5))
    with pytest.raises(TypeError, match="float"):
        tok.encode(torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="8x8"):
        tok.encode(torch.zeros(1, 3, 16, 16))


@pytest.mark.parametrize("name", NAMES)
def test_bad_tokens(name):
    tok = make(name)
    spec = tok.spec
    data = torch.zeros(1, spec.length, spec.channels, dtype=torch.long)
    high = spec.vocab_size if spec.kind == "index" else 2
    data[0, -1, 0] = high
    with pytest.raises(ValueError, match="values must lie"):
        Tokens(data, spec)
    with pytest.raises(ValueError, match="values must lie"):
        tok.decode(_raw(data, spec))
    data[0, -1, 0] = -1
    with pytest.raises(ValueError, match="values must lie"):
        tok.embed(_raw(data, spec))
    with pytest.raises(TypeError, match="Tokens"):
        tok.decode(torch.zeros(1, spec.length, spec.channels, dtype=torch.long))
    other = TokenSpec(kind="index", vocab_size=7, layout=Grid(4, 4)) if spec.kind == "bits" else \
        TokenSpec(kind="bits", bits=3, layout=Grid(4, 4))
    with pytest.raises(ValueError, match="does not match"):
        tok.decode(Tokens(torch.zeros(1, 16, other.channels, dtype=torch.long), other))
    with pytest.raises(ValueError, match="does not match"):
        tok.embed(Tokens(torch.zeros(1, 16, other.channels, dtype=torch.long), other))


def _raw(data, spec):
    """A Tokens object holding out-of-range values (bypassing its own validation, as a buggy caller might)."""
    t = object.__new__(Tokens)
    t.data, t.spec = data, spec
    return t
