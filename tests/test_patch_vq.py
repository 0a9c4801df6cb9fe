"""Patch-local VQ tokenizer: each token depends on its own patch only; the rest is VQTokenizer's contract."""

import pytest
import torch

from tokenloom.tokenizers import TOKENIZERS, build
from tokenloom.tokenizers.patch_vq import PatchVQTokenizer

TINY = dict(image_size=16, ch=8, ch_mult=[1, 2, 4], z_channels=8, norm_groups=4, codebook_size=32)


def _tiny() -> PatchVQTokenizer:
    torch.manual_seed(0)
    return build("patch_vq", **TINY).eval()


def test_a_token_depends_on_its_own_patch_only():
    tok = _tiny()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    y = x.clone()
    y[:, :, 4:8, 8:12] = torch.rand(1, 3, 4, 4) * 2 - 1  # patch (1, 2) of the 4x4 grid
    with torch.no_grad():
        changed = (tok.encode_latent(x) - tok.encode_latent(y)).abs().amax(dim=1)[0]  # [4, 4]
    assert changed[1, 2] > 0
    changed[1, 2] = 0
    assert changed.abs().max() == 0


def test_equal_patches_get_equal_codes_whatever_the_rest_of_the_image():
    tok = _tiny()
    x = -torch.ones(3, 3, 16, 16)  # black images ...
    x[1, :, 0:4, 0:4] = 1.0  # ... one with a white patch, one with a random one
    x[2, :, 12:16, 4:12] = torch.rand(3, 4, 8) * 2 - 1
    codes = tok.encode(x).data[..., 0]  # [3, 16]
    black = codes[0, 0]
    assert (codes[0] == black).all()
    assert (codes[1, 1:] == black).all()
    assert (codes[2, :12] == black).all() and (codes[2, 12] == black)


def test_spec_training_step_and_save_load_round_trip(tmp_path):
    tok = _tiny()
    assert tok.spec.kind == "index" and tok.spec.vocab_size == 32 and tok.spec.layout.h == 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = tok.train()(x)
    out["loss"].backward()
    assert tok.encoder.proj.weight.grad.abs().sum() > 0  # straight-through reaches the patch encoder
    tok.eval().save_pretrained(tmp_path)
    loaded = TOKENIZERS.load(str(tmp_path))
    assert type(loaded) is PatchVQTokenizer
    assert torch.equal(loaded.encode(x).data, tok.encode(x).data)


def test_encoder_attention_is_refused():
    with pytest.raises(ValueError, match="attn_levels must be None for patch_vq"):
        build("patch_vq", **TINY, attn_levels=[2])
