"""diffusers.VQModel adapter: index tokens equal to diffusers' own quantisation, loading, save/load, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import VQModel

from tokenloom.tokenizers import available, build
from tokenloom.tokenizers.vqmodel_adapter import VQModelTokenizer
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

TINY = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
        "num_vq_embeddings": 32, "vq_embed_dim": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2, "sample_size": 16}
# MoVQ's spatially-normalised decoder hard-codes 32 GroupNorm groups and needs vq_embed_dim == latent_channels;
# aMUSEd looks indices up itself.
VARIANTS = {
    "plain": {},
    "movq": {"block_out_channels": [32, 32], "norm_num_groups": 8, "norm_type": "spatial", "vq_embed_dim": 4},
    "amused": {"lookup_from_codebook": True, "force_upcast": True},
}


def tiny_vqmodel(variant: str = "plain") -> VQModel:
    torch.manual_seed(0)
    model = VQModel(**{**TINY, **VARIANTS[variant]}).eval()
    with torch.no_grad():  # spread the codebook so that random latents use many codes
        model.quantize.embedding.weight.normal_(0, 0.5)
    return model


def images(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_registered():
    assert "vqmodel" in available()
    tok = build("vqmodel", image_size=16, vqmodel_config=TINY)
    assert tok.spec == TokenSpec(kind="index", vocab_size=32, layout=Grid(8, 8))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_diffusers_quantisation_and_reconstruction(tmp_path, variant):
    model = tiny_vqmodel(variant)
    model.save_pretrained(tmp_path / "vqvae")
    tok = VQModelTokenizer.from_diffusers(str(tmp_path), subfolder="vqvae").eval()
    x = images()
    with torch.no_grad():
        tokens = tok.encode(x)
        _, _, (_, _, want) = model.quantize(model.encode(x).latents)
        assert tokens.spec == tok.spec == TokenSpec(kind="index", vocab_size=32, layout=Grid(8, 8))
        assert tokens.data.shape == (2, 64, 1) and tokens.data.dtype == torch.long
        assert torch.equal(tokens.data.flatten(), want.flatten())
        assert len(tokens.data.unique()) > 4
        recon = tok.decode(tokens)
        assert recon.shape == x.shape
        torch.testing.assert_close(recon, model(x).sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tok.embed(tokens), model.quantize.embedding.weight[tokens.data[..., 0]])
    assert tok.to_diffusers() is tok.vqmodel


def test_save_load_identical_encodings(tmp_path):
    tok = VQModelTokenizer.from_diffusers(tiny_vqmodel()).eval()
    tok.save_pretrained(tmp_path)
    loaded = VQModelTokenizer.from_pretrained(tmp_path).eval()
    x = images(3, seed=1)
    with torch.no_grad():
        assert torch.equal(tok.encode(x).data, loaded.encode(x).data)
        assert torch.equal(tok.decode(tok.encode(x)), loaded.decode(loaded.encode(x)))


def test_training_forward_learns():
    torch.manual_seed(0)
    tok = VQModelTokenizer(image_size=16, vqmodel_config=TINY).train()
    blocks = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = torch.nn.functional.interpolate(blocks, scale_factor=4)
    out = tok(x)
    assert out["recon"].shape == x.shape
    torch.testing.assert_close(out["loss"], out["recon_loss"] + out["quantizer_loss"])
    opt = torch.optim.Adam(tok.parameters(), lr=5e-3)
    first = float(out["recon_loss"])
    for _ in range(25):
        out = tok(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["recon_loss"]) < 0.85 * first


def test_bad_input_is_rejected():
    tok = VQModelTokenizer.from_diffusers(tiny_vqmodel())
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tok.encode(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 17, 17))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tok.encode(torch.full((1, 3, 16, 16), -2.0))
    with pytest.raises(ValueError, match=r"\[0, 31\]"):  # out-of-range indices
        tok.decode(Tokens(torch.full((1, 64, 1), 32), tok.spec))
    with pytest.raises(ValueError, match="does not match"):
        tok.decode(Tokens(torch.zeros(1, 64, 1, dtype=torch.long),
                          TokenSpec(kind="index", vocab_size=64, layout=Grid(8, 8))))
    with pytest.raises(ValueError, match="does not match"):
        tok.decode(Tokens(torch.zeros(1, 64, 1, dtype=torch.long),
                          TokenSpec(kind="index", vocab_size=32, layout=Sequence(64))))
    with pytest.raises(TypeError, match="path_or_model"):
        VQModelTokenizer.from_diffusers(None)
    with pytest.raises(ValueError, match="image_size"):
        VQModelTokenizer(image_size=15, vqmodel_config=TINY)
    with pytest.raises(ValueError, match="recon_loss"):
        VQModelTokenizer(image_size=16, vqmodel_config=TINY, recon_loss="ssim")
