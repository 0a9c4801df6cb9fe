"""MAR fixtures → tokenloom: MaskedAR + diffusion head and the KL VAE reproduce every recorded output.

Fixture roots: ``$TOKENLOOM_FIXTURES`` (default ``../shared/fixtures``) and ``tests/fixtures/alt_sizes`` (other sizes,
kept small), folders ``mar/mar`` and ``mar/vae`` (tests needing the VAE skip for a set without one). Every size and
file name is read from the fixture's checkpoint and config.json, so fixture sets of other sizes run unchanged.
"""

from __future__ import annotations

import fractions
import json
import os
import re
from pathlib import Path

import pytest
import torch

import tokenloom
from tokenloom.generators.masked_ar_layers import mar_guidance_values, patchify, unpatchify
from tokenloom.interop.mar import (
    convert_mar,
    convert_mar_vae,
    mar_pipeline,
    mar_sampling_params,
    masked_ar_config,
    read_mar_checkpoint,
)
from tokenloom.tokens import Grid, Tokens

ROOTS = {"env": Path(os.environ["TOKENLOOM_FIXTURES"]), "alt_sizes": Path(__file__).parent / "fixtures" / "alt_sizes"}


def _folder_params(part: str) -> list:
    return [pytest.param(root / "mar" / part, id=name, marks=pytest.mark.skipif(
        not (root / "mar" / part / "config.json").is_file(), reason=f"no MAR {part} fixture under {root}"))
        for name, root in ROOTS.items()]


MAR_DIRS, VAE_DIRS = _folder_params("mar"), _folder_params("vae")


def _checkpoint(folder: Path) -> Path:
    return folder / json.loads((folder / "config.json").read_text())["checkpoint"]["file"]


def _vae_of(mar_dir: Path) -> Path:
    """The VAE folder of the same fixture set (skips when the set has none)."""
    vae_dir = mar_dir.parent / "vae"
    if not (vae_dir / "config.json").is_file():
        pytest.skip(f"no MAR VAE fixture in {vae_dir}")
    return vae_dir


def _two_labels(model) -> list[int]:
    n = model.config.num_classes
    return [min(1, n - 1), n - 1]


def _within(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """The fixtures README's acceptance: float32 max|got − ref| <= 2e-5·max(1, max|ref|); float64 schedules within
    1e-12; integers exactly."""
    if not ref.is_floating_point():
        return torch.equal(got, ref)
    err = float((got.double() - ref.double()).abs().max())
    if ref.dtype == torch.float64:
        return err <= 1e-12
    return err <= 2e-5 * max(1.0, float(ref.abs().max()))


def _checked_names(folder: Path) -> set[str]:
    meta = json.loads((folder / "io.json").read_text())
    return {t["name"] for t in meta["tensors"] if t["role"] != "input"}


def _cfg_scale(folder: Path) -> float:
    meta = json.loads((folder / "io.json").read_text())
    call = next(t["produced_by"] for t in meta["tensors"] if t["name"] == "diff_net_out_cfg")
    return float(re.search(r"cfg_scale=([0-9.]+)", call).group(1))


@pytest.fixture(scope="module", params=MAR_DIRS)
def mar(request):
    from safetensors.torch import load_file

    folder = request.param
    model = convert_mar(_checkpoint(folder), folder / "config.json")
    return model, load_file(str(folder / "io.safetensors")), folder


@torch.no_grad()
def _mar_outputs(model, io, folder: Path) -> dict[str, torch.Tensor]:
    """Every recorded MAR output, computed by tokenloom."""
    out = {}
    p, (h, w), c = model.config.patch_size, model.grid, model.spec.dim
    latent = io["latent"]
    out["tokens"] = patchify(latent, p)
    # the generator's own route from tokenizer tokens ([B, h·w, c], row-major) to MAR's patches
    assert torch.equal(model.to_patches(Tokens(latent.flatten(2).transpose(1, 2), model.spec)), out["tokens"])
    out["unpatchify_tokens"] = unpatchify(io["tokens"], c, h, w, p)
    labels = torch.where(io["uncond"], torch.full_like(io["labels"], model.config.num_classes), io["labels"])
    out["class_embedding"] = model.class_embedding(labels)
    buffer = model.vector_buffer(io["class_embedding"])
    for case in "AB":
        mask = io[f"mask_{case}"].bool()
        out[f"encoder_out_{case}"] = model.encode(io["tokens"], mask, buffer)
        out[f"z_{case}"] = model.decode(io[f"encoder_out_{case}"], mask)

    head = model.output_head
    x, t, c_in = io["diff_x_t"], io["diff_t"], io["diff_c"]
    out["diff_net_out"] = head(x, t, c_in)
    # forward_with_cfg: the net on [x[:h], x[:h]] with t and c as given; guided eps in both halves, v per row
    half = x.shape[0] // 2
    raw = head(torch.cat([x[:half], x[:half]]), t, c_in)
    cond, uncond = raw[:half, :head.dim], raw[half:, :head.dim]
    guided = uncond + _cfg_scale(folder) * (cond - uncond)
    out["diff_net_out_cfg"] = torch.cat([torch.cat([guided, guided]), raw[:, head.dim:]], dim=1)
    chain = head.chain()  # the head's num_sampling_steps, read from MAR's config
    step = io["diff_t_spaced"]
    pmv = chain.p_mean_variance(head.predict(x, chain.model_timesteps(step), c_in), x, step)
    for ours, theirs in (("mean", "pmv_mean"), ("variance", "pmv_variance"), ("log_variance", "pmv_log_variance"),
                         ("pred_x0", "pmv_pred_xstart")):
        out[theirs] = pmv[ours]
    losses = head.training_losses(c_in, io["diff_x_start"], t, io["diff_noise"])
    for k in ("loss", "mse", "vb"):
        out[f"train_{k}"] = losses[k]
    out["train_betas"] = head.train_chain.betas
    out["gen_betas"] = chain.betas
    out["gen_timestep_map"] = chain.timestep_map
    return out


def test_mar_reproduces_every_recorded_output(mar):
    model, io, folder = mar
    out = _mar_outputs(model, io, folder)
    assert set(out) == _checked_names(folder)
    bad = {k: float((v.double() - io[k].double()).abs().max()) for k, v in out.items()
           if v.shape != io[k].shape or not _within(v, io[k])}
    assert not bad, f"outside the README tolerance: {bad}"


def test_mar_sizes_come_from_the_checkpoint(mar):
    model, io, folder = mar
    cfg = json.loads((folder / "config.json").read_text())
    args = cfg["MAR"]
    sd, _ = read_mar_checkpoint(_checkpoint(folder))
    assert model.seq_len == io["tokens"].shape[1] and model.token_dim == io["tokens"].shape[2]
    assert model.buffer_size == sd["encoder_pos_embed_learned"].shape[1] - model.seq_len == args["buffer_size"]
    assert model.output_head.num_sampling_steps == int(args["num_sampling_steps"])
    assert model.config.patch_size == args["patch_size"] and model.config.num_classes == args["class_num"]
    assert (model.config.encoder_depth, model.config.decoder_depth) == (args["encoder_depth"], args["decoder_depth"])
    assert (model.config.encoder_num_heads, model.config.decoder_num_heads) == (args["encoder_num_heads"],
                                                                                args["decoder_num_heads"])
    assert model.seq_len == (args["img_size"] // args["vae_stride"] // args["patch_size"]) ** 2
    # without a config, only what a state dict cannot hold is missing: the number of heads
    with pytest.raises(ValueError, match="do not store encoder_num_heads"):
        masked_ar_config(sd, None)


def test_loading_model_instead_of_model_ema_is_detected(mar):
    model, io, folder = mar
    wrong = convert_mar(_checkpoint(folder), folder / "config.json", entry="model")
    with torch.no_grad():
        mask = io["mask_A"].bool()
        z = wrong.decode(wrong.encode(io["tokens"], mask, wrong.vector_buffer(io["class_embedding"])), mask)
    assert not _within(z, io["z_A"])


@pytest.mark.parametrize("vae_dir", VAE_DIRS)
@torch.no_grad()
def test_vae_reproduces_every_recorded_output(vae_dir):
    from safetensors.torch import load_file

    io = load_file(str(vae_dir / "io.safetensors"))
    tok = convert_mar_vae(_checkpoint(vae_dir), vae_dir / "config.json")
    mean, logvar = tok.posterior(io["image"])
    out = {"moments": tok.autoencoder.moments(io["image"]), "posterior_mean": mean, "posterior_logvar": logvar,
           "posterior_std": torch.exp(0.5 * logvar), "decoded": tok.autoencoder.decode(io["latent_in"])}
    assert set(out) == _checked_names(vae_dir)
    bad = {k: float((v - io[k]).abs().max()) for k, v in out.items() if not _within(v, io[k])}
    assert not bad, f"outside the README tolerance: {bad}"
    # tokens are MAR's scaled latents
    tokens = tok.encode(io["image"])
    assert torch.allclose(tokens.data, mean.flatten(2).transpose(1, 2) * 0.2325)
    # the same weights without a config: every size from the keys
    assert convert_mar_vae(_checkpoint(vae_dir)).config.autoencoder_config == tok.config.autoencoder_config
    derived = json.loads((vae_dir / "config.json").read_text())["derived"]
    assert [tok.spec.dim, tok.spec.layout.h, tok.spec.layout.w] == derived["latent_shape"]


@pytest.mark.parametrize("mar_dir", MAR_DIRS)
def test_bad_checkpoints_fail_clearly(mar_dir, tmp_path):
    mar_ckpt = _checkpoint(mar_dir)
    full = torch.load(mar_ckpt, weights_only=True, map_location="cpu")
    cfg = mar_dir / "config.json"
    with pytest.raises(ValueError, match="unknown MAR checkpoint container.*bare state dict"):
        convert_mar(full["model_ema"], cfg)
    with pytest.raises(ValueError, match="unknown MAR checkpoint container"):
        convert_mar([1, 2], cfg)
    with pytest.raises(ValueError, match="no 'model_ema' entry"):
        convert_mar({"model": full["model"]}, cfg)
    sd = dict(full["model_ema"])
    del sd["encoder_norm.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["mask_token"] = torch.zeros(1, 1, 3)
    with pytest.raises(ValueError, match=r"missing keys: \['encoder_norm.weight'\]") as err:
        convert_mar({"model_ema": sd}, cfg)
    assert "unexpected keys: ['extra.weight']" in str(err.value)
    width = full["model_ema"]["mask_token"].shape[-1]
    assert f"mask_token: checkpoint (1, 1, 3) vs model (1, 1, {width})" in str(err.value)
    args = json.loads(cfg.read_text())["MAR"]
    with pytest.raises(ValueError, match=r"config says buffer_size=999 but the checkpoint has buffer_size="):
        convert_mar(mar_ckpt, {**args, "buffer_size": 999})
    with pytest.raises(ValueError, match="unknown MAR arguments"):
        convert_mar(mar_ckpt, {**args, "depth": 3})

    vae_ckpt = _checkpoint(_vae_of(mar_dir))
    vae = torch.load(vae_ckpt, weights_only=True, map_location="cpu")["model"]
    with pytest.raises(ValueError, match="unknown MAR VAE checkpoint container"):
        convert_mar_vae(vae)
    bad = dict(vae)
    bad["decoder.conv_out.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"decoder.conv_out.bias: checkpoint \(5,\) vs model \(3,\)"):
        convert_mar_vae({"model": bad})
    path = tmp_path / "pickled.pth"
    torch.save({"model": vae, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="weights_only=True refuses"):
        convert_mar_vae(path)


def test_sampling_settings_translation(mar):
    model, _, folder = mar
    length = model.seq_len
    steps = min(4, length)
    params = mar_sampling_params(cfg=2.9, num_iter=steps, seq_len=length)
    assert params.num_steps == steps and params.guidance_schedule.kind == "steps"
    assert list(params.guidance_schedule.values) == mar_guidance_values(2.9, length, steps)
    assert [params.at_step(s, steps).guidance_scale for s in range(steps)] == mar_guidance_values(2.9, length, steps)
    assert not mar_sampling_params(cfg=1.0, num_iter=steps, seq_len=length).uses_guidance
    assert mar_sampling_params(cfg=3.0, num_iter=steps, seq_len=length, cfg_schedule="constant").guidance_scale == 3.0
    with pytest.raises(ValueError, match="num_steps"):
        mar_sampling_params(cfg=2.0, num_iter=length + 1, seq_len=length)
    assert convert_mar(_checkpoint(folder), folder / "config.json",
                       temperature=0.95).output_head.noise_temperature == 0.95


def _count_backbone_calls(generator) -> list:
    calls, inner = [], generator.backbone
    generator.backbone = lambda *a: calls.append(1) or inner(*a)
    return calls


@pytest.mark.parametrize("mar_dir", MAR_DIRS)
def test_converted_pipeline_generates_with_mars_settings(mar_dir, tmp_path):
    vae_dir = _vae_of(mar_dir)
    pipe = mar_pipeline(_checkpoint(mar_dir), {"model": torch.load(_checkpoint(vae_dir), weights_only=True)["model"]},
                        mar_dir / "config.json", vae_dir / "config.json", cfg=2.0, num_iter=3)
    pipe.set_progress_bar_config(disable=True)
    gen = pipe.token_generator
    labels = _two_labels(gen)
    assert list(pipe.sampling_params().guidance_schedule.values) == mar_guidance_values(2.0, gen.seq_len, 3)
    calls = _count_backbone_calls(gen)
    out = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt")
    again = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt")
    size = gen.spec.layout.h * pipe.image_tokenizer.downsample_factor
    assert out.images.shape == (2, 3, size, size) and torch.equal(out.images, again.images)
    assert len(calls) == 2 * 3  # num_iter backbone passes per call (guidance doubles the batch, not the passes)

    pipe.save_pretrained(tmp_path)
    loaded = tokenloom.pipeline("class-to-image", model=str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    reloaded = loaded(labels, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(reloaded.images, out.images)
    assert loaded.sampling_params() == pipe.sampling_params()


# ---------------------------------------------------------------- other sizes (no fixture files needed)
_TO_MAR = ((r"^output_head\.net\.time_embed\.linear_1\.", "diffloss.net.time_embed.mlp.0."),
           (r"^output_head\.net\.time_embed\.linear_2\.", "diffloss.net.time_embed.mlp.2."),
           (r"^output_head\.net\.blocks\.(\d+)\.norm\.", r"diffloss.net.res_blocks.\1.in_ln."),
           (r"^output_head\.net\.blocks\.(\d+)\.fc1\.", r"diffloss.net.res_blocks.\1.mlp.0."),
           (r"^output_head\.net\.blocks\.(\d+)\.fc2\.", r"diffloss.net.res_blocks.\1.mlp.2."),
           (r"^output_head\.net\.blocks\.(\d+)\.modulation\.", r"diffloss.net.res_blocks.\1.adaLN_modulation.1."),
           (r"^output_head\.net\.final\.modulation\.", "diffloss.net.final_layer.adaLN_modulation.1."),
           (r"^output_head\.net\.final\.proj\.", "diffloss.net.final_layer.linear."),
           (r"^output_head\.net\.", "diffloss.net."))


def _as_mar_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in _TO_MAR:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        out[key] = value
    return out


def test_other_sizes_convert_unchanged():
    """A MAR of other sizes (patch 2, buffer 3, unequal widths and depths, 2 vs 4 heads, DiffLoss 3 x 48, 25 steps),
    written with MAR's keys, converts from its constructor arguments alone and computes the same z."""
    from tokenloom.generators.masked_ar import MaskedAR
    from tokenloom.tokens import TokenSpec

    torch.manual_seed(0)
    spec = TokenSpec(kind="continuous", dim=3, layout=Grid(6, 6))
    args = {"img_size": 24, "vae_stride": 4, "patch_size": 2, "encoder_embed_dim": 32, "encoder_depth": 2,
            "encoder_num_heads": 2, "decoder_embed_dim": 48, "decoder_depth": 1, "decoder_num_heads": 4,
            "mlp_ratio": 2.0, "norm_layer": "partial(nn.LayerNorm, eps=1e-6)", "vae_embed_dim": 3, "class_num": 7,
            "buffer_size": 3, "diffloss_d": 3, "diffloss_w": 48, "num_sampling_steps": "25"}
    ref = MaskedAR(spec.to_dict(), patch_size=2, encoder_width=32, encoder_depth=2, encoder_num_heads=2,
                   decoder_width=48, decoder_depth=1, decoder_num_heads=4, mlp_ratio=2.0, buffer_size=3,
                   num_classes=7, head_options={"depth": 3, "mlp_width": 48, "num_sampling_steps": 25}).eval()
    with torch.no_grad():
        for param in ref.parameters():
            param.normal_(0, 0.3)
    sd = _as_mar_state_dict(ref)
    model = convert_mar({"model_ema": sd, "model": sd}, args)
    assert model.seq_len == 9 and model.token_dim == 12 and model.output_head.num_sampling_steps == 25
    x = torch.randn(2, 9, 12)
    mask = torch.arange(9).expand(2, 9) >= 4
    with torch.no_grad():
        z = [m.backbone(x, mask, m.vector_buffer(m.class_embedding(torch.tensor([2, 7])))) for m in (ref, model)]
        t = torch.tensor([0, 999] * 9)
        eps = [m.output_head(x.flatten(0, 1), t, zz.flatten(0, 1)) for m, zz in zip((ref, model), z)]
    assert torch.equal(z[0], z[1]) and torch.equal(eps[0], eps[1])
    with pytest.raises(ValueError, match="config says vae_embed_dim=4 but the checkpoint has vae_embed_dim=3"):
        convert_mar({"model_ema": sd}, {**args, "vae_embed_dim": 4})


def test_other_vae_sizes_convert_unchanged():
    """A 3-level VAE with 2 blocks per level, encoder attention on level 1 and decoder attention on level 2."""
    from tokenloom.tokenizers.kl_vae import LDMAutoencoderKL

    torch.manual_seed(0)
    ae = LDMAutoencoderKL(ch=32, ch_mult=[1, 2, 1], num_res_blocks=2, latent_channels=5, attn_levels=[1],
                          decoder_attn_levels=[2]).eval()
    config = {"AutoencoderKL": {"embed_dim": 5, "ch_mult": [1, 2, 1], "use_variational": True},
              "encoder_decoder_overrides": {"ch": 32, "num_res_blocks": 2, "resolution": 16,
                                            "encoder_attn_resolutions": [8], "decoder_attn_resolutions": [4]}}
    tok = convert_mar_vae({"model": ae.state_dict()}, config)
    assert tok.spec.layout == Grid(4, 4) and tok.spec.dim == 5
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tok.autoencoder.moments(image), ae.moments(image))
    wrong = {**config, "encoder_decoder_overrides": {**config["encoder_decoder_overrides"],
                                                      "encoder_attn_resolutions": [16]}}
    with pytest.raises(ValueError, match=r"encoder attention levels=\[0\] but the checkpoint has .*=\[1\]"):
        convert_mar_vae({"model": ae.state_dict()}, wrong)
