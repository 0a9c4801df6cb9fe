"""KL-VAE tokenizer: the continuous-token contract, latent scaling, diffusers loading, MAR's module tree, bad input."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import AutoencoderKL

from tokenloom.tokenizers import available, build
from tokenloom.tokenizers.kl_vae import KLVAETokenizer
from tokenloom.tokens import Grid, Sequence, Tokens, TokenSpec

TINY_LDM = {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "latent_channels": 4, "attn_levels": [1],
            "decoder_attn_levels": [], "mid_attn": True, "norm_groups": 4}
TINY_DIFFUSERS = {"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 4,
                  "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                  "sample_size": 16}
MAR_FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "mar", "vae")


def tiny(architecture: str = "ldm", **kw) -> KLVAETokenizer:
    torch.manual_seed(0)
    config = TINY_LDM if architecture == "ldm" else TINY_DIFFUSERS
    return KLVAETokenizer(image_size=16, architecture=architecture, autoencoder_config=config, **kw).eval()


def images(b: int = 2, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_diffusers_vae(**config) -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(**{**TINY_DIFFUSERS, **config}).eval()


def test_registered():
    assert "kl_vae" in available()
    assert isinstance(build("kl_vae", image_size=16, autoencoder_config=TINY_LDM), KLVAETokenizer)


@pytest.mark.parametrize("architecture", ["ldm", "diffusers"])
def test_roundtrip_shapes_and_honest_spec(architecture):
    tok = tiny(architecture)
    x = images()
    tokens = tok.encode(x)
    assert tok.spec == TokenSpec(kind="continuous", dim=4, layout=Grid(8, 8))
    assert tokens.spec == tok.spec and tokens.data.shape == (2, 64, 4) and tokens.data.dtype == torch.float32
    assert tok.decode(tokens).shape == x.shape
    assert torch.equal(tok.embed(tokens), tokens.data)


def test_scaling_and_shift_are_applied_and_inverted():
    tok = tiny(scaling_factor=[0.5, 2.0, 1.0, 3.0], shift_factor=0.25)
    x = images()
    with torch.no_grad():
        mean, _ = tok.posterior(x)
        tokens = tok.encode(x)
        scale = torch.tensor([0.5, 2.0, 1.0, 3.0])
        want = (mean.permute(0, 2, 3, 1).reshape(2, 64, 4) - 0.25) * scale  # row-major positions
        torch.testing.assert_close(tokens.data, want)
        torch.testing.assert_close(tok.decode(tokens), tok.autoencoder.decode(mean), rtol=1e-5, atol=1e-5)


def test_posterior_sampling_uses_the_generator():
    tok = tiny(scaling_factor=0.5)
    x = images()
    with torch.no_grad():
        a = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3)).data
        b = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(3)).data
        c = tok.encode(x, sample=True, generator=torch.Generator().manual_seed(4)).data
        mean, logvar = tok.posterior(x)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        want = tok.latent_to_tokens(mean + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, want)


def test_calibrate_scaling_gives_unit_variance_tokens_and_is_saved(tmp_path):
    tok = tiny()
    x = images(4)
    scale = tok.calibrate_scaling(x, shift=True)
    with torch.no_grad():
        data = tok.encode(x).data
    assert abs(float(data.std()) - 1.0) < 1e-4 and abs(float(data.mean())) < 1e-4
    tok.save_pretrained(tmp_path)
    assert KLVAETokenizer.from_pretrained(tmp_path).config.scaling_factor == pytest.approx(scale)


@pytest.mark.parametrize("architecture", ["ldm", "diffusers"])
def test_save_load_identical_encodings(tmp_path, architecture):
    tok = tiny(architecture, scaling_factor=0.3, shift_factor=[0.1, 0.0, -0.1, 0.2])
    x = images()
    tok.save_pretrained(tmp_path)
    loaded = KLVAETokenizer.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(tok.encode(x).data, loaded.encode(x).data)
        assert torch.equal(tok.decode(tok.encode(x)), loaded.decode(loaded.encode(x)))


def test_from_diffusers_folder_reads_the_vae_config(tmp_path):
    vae = tiny_diffusers_vae(scaling_factor=1.5, shift_factor=0.1)
    vae.save_pretrained(tmp_path / "vae")
    tok = KLVAETokenizer.from_diffusers(str(tmp_path), subfolder="vae").eval()
    assert tok.image_size == 16 and tok.spec == TokenSpec(kind="continuous", dim=4, layout=Grid(8, 8))
    x = images()
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        tokens = tok.encode(x)
        torch.testing.assert_close(tokens.data, (mean.flatten(2).transpose(1, 2) - 0.1) * 1.5)
        torch.testing.assert_close(tok.decode(tokens), vae.decode(mean).sample, rtol=1e-5, atol=1e-5)
    assert tok.to_diffusers().config.latent_channels == 4


def test_from_diffusers_explicit_and_per_channel_statistics():
    vae = tiny_diffusers_vae(scaling_factor=0.5, latents_mean=[0.0, 0.1, 0.2, 0.3], latents_std=[1.0, 2.0, 4.0, 0.5])
    tok = KLVAETokenizer.from_diffusers(vae)
    torch.testing.assert_close(tok.latent_scale, torch.tensor([0.5, 0.25, 0.125, 1.0]))
    torch.testing.assert_close(tok.latent_shift, torch.tensor([0.0, 0.1, 0.2, 0.3]))
    tok = KLVAETokenizer.from_diffusers(vae, scaling_factor=2.0, shift_factor=0.0, image_size=32)
    assert tok.spec.layout == Grid(16, 16) and torch.equal(tok.latent_scale, torch.full((4,), 2.0))


@pytest.mark.skipif(not os.path.isdir(MAR_FIXTURE), reason="MAR fixtures not available")
def test_ldm_tree_hosts_mar_kl_vae_checkpoint():
    """MAR's AutoencoderKL checkpoint loads into the "ldm" tree unchanged and reproduces its outputs."""
    from safetensors.torch import load_file

    tok = KLVAETokenizer(image_size=8, architecture="ldm", scaling_factor=0.2325, autoencoder_config={
        "ch": 32, "ch_mult": [2, 1], "num_res_blocks": 1, "latent_channels": 8, "attn_levels": [1],
        "decoder_attn_levels": [], "mid_attn": True, "norm_groups": 32}).eval()
    state = torch.load(os.path.join(MAR_FIXTURE, "kl_tiny.ckpt"), map_location="cpu", weights_only=True)["model"]
    tok.autoencoder.load_state_dict(state, strict=True)
    io = load_file(os.path.join(MAR_FIXTURE, "io.safetensors"))
    with torch.no_grad():
        mean, logvar = tok.posterior(io["image"])
        torch.testing.assert_close(mean, io["posterior_mean"], rtol=0, atol=2e-5)
        torch.testing.assert_close(logvar, io["posterior_logvar"], rtol=0, atol=2e-5)
        tokens = tok.encode(io["image"])
        torch.testing.assert_close(tokens.data, io["posterior_mean"].flatten(2).transpose(1, 2) * 0.2325)
        decoded = tok.decode(Tokens(tok.latent_to_tokens(io["latent_in"]), tok.spec))
        torch.testing.assert_close(decoded, io["decoded"], rtol=0, atol=2e-5)


def test_training_loss_is_recon_plus_weighted_kl_and_learns():
    tok = tiny(kl_weight=0.01, sample_posterior=False).train()
    blocks = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = torch.nn.functional.interpolate(blocks, scale_factor=4)  # piecewise-constant 16x16 images
    out = tok(x)
    assert out["recon"].shape == x.shape
    torch.testing.assert_close(out["loss"], out["recon_loss"] + 0.01 * out["kl_loss"])
    opt = torch.optim.Adam(tok.parameters(), lr=5e-3)
    first = float(out["recon_loss"])
    for _ in range(25):
        out = tok(x)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["recon_loss"]) < 0.5 * first


def test_bad_images_are_rejected():
    tok = tiny()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tok.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 3, 15, 15))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        tok.encode(torch.full((1, 3, 16, 16), 1.5))
    with pytest.raises(TypeError, match="float"):
        tok.encode(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(TypeError, match="generator"):
        tok.encode(images(), sample=True, generator=0)


def test_bad_tokens_are_rejected():
    tok = tiny()
    with pytest.raises(ValueError, match="does not match"):
        tok.decode(Tokens(torch.zeros(1, 64, 8), TokenSpec(kind="continuous", dim=8, layout=Grid(8, 8))))
    with pytest.raises(ValueError, match="does not match"):
        tok.decode(Tokens(torch.zeros(1, 16, 4), TokenSpec(kind="continuous", dim=4, layout=Grid(4, 4))))
    with pytest.raises(ValueError, match="does not match"):
        tok.decode(Tokens(torch.zeros(1, 64, 4), TokenSpec(kind="continuous", dim=4, layout=Sequence(64))))
    with pytest.raises(TypeError, match="Tokens"):
        tok.decode(torch.zeros(1, 64, 4))


@pytest.mark.parametrize("kwargs, match", [
    ({"architecture": "sd"}, "architecture"),
    ({"scaling_factor": 0.0}, "scaling_factor"),
    ({"shift_factor": [0.0, 1.0]}, "shift_factor"),
    ({"kl_weight": -1.0}, "kl_weight"),
    ({"recon_loss": "lpips"}, "recon_loss"),
    ({"image_size": 15}, "image_size"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = {"image_size": 16, "autoencoder_config": TINY_LDM, **kwargs}
    with pytest.raises(ValueError, match=match):
        KLVAETokenizer(**args)


def test_from_diffusers_rejects_other_objects():
    with pytest.raises(TypeError, match="path_or_model"):
        KLVAETokenizer.from_diffusers(3)
    with pytest.raises(ValueError, match="architecture='diffusers'"):
        tiny("ldm").to_diffusers()


@pytest.mark.slow
def test_shipped_recipe_reaches_30db():
    """configs/tokenizer/kl_vae_shapes.yaml: test-split PSNR >= 30 dB (issue 3 bar)."""
    import yaml

    from tokenloom.training.tokenizer_trainer import train_from_config

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "tokenizer", "kl_vae_shapes.yaml")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    result = train_from_config(cfg, progress=False)
    print(result["eval"])
    assert result["eval"]["psnr"] >= 30.0
