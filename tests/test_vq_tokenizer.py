"""VQ tokenizer slice: autoencoder, vector quantiser, VQTokenizer, trainer and reconstruction metrics."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from tokenloom.evaluation.reconstruction import code_usage, evaluate_reconstruction, psnr, ssim
from tokenloom.tokenizers import available, build
from tokenloom.tokenizers.autoencoder import AttnBlock, Decoder, Encoder
from tokenloom.tokenizers.quantizers.vq import VectorQuantizer
from tokenloom.tokenizers.vq import VQTokenizer
from tokenloom.tokens import Grid, Tokens, TokenSpec
from tokenloom.training.tokenizer_trainer import TrainConfig, lr_factor, train_tokenizer

TINY = dict(image_size=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4,
            codebook_size=32, codebook_dim=4)
RECIPE = os.path.join(os.path.dirname(__file__), "..", "configs", "tokenizer", "vq_shapes.yaml")


def _tiny(**overrides):
    torch.manual_seed(0)
    return build("vq", **{**TINY, **overrides}).eval()


def _images(b=2, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------- autoencoder
def test_encoder_decoder_shapes_and_module_names():
    enc = Encoder(3, ch=8, ch_mult=[1, 2, 2], num_res_blocks=2, z_channels=6, norm_groups=4)
    dec = Decoder(3, ch=8, ch_mult=[1, 2, 2], num_res_blocks=2, z_channels=6, norm_groups=4)
    x = _images(2, 16)
    z = enc(x)
    assert z.shape == (2, 6, 4, 4) and enc.downsample_factor == 4
    assert dec(z).shape == (2, 3, 16, 16)
    keys = set(enc.state_dict()) | {f"decoder.{k}" for k in dec.state_dict()}
    for key in ["down.0.block.1.conv1.weight", "down.1.block.0.nin_shortcut.weight",
                "down.1.downsample.conv.weight", "mid.block_1.norm1.weight",
                "mid.attn_1.q.weight", "mid.block_2.conv2.bias", "down.2.attn.1.proj_out.weight",
                "norm_out.weight", "conv_out.weight", "decoder.up.0.block.2.conv2.weight",
                "decoder.up.1.upsample.conv.weight", "decoder.up.2.attn.2.k.weight", "decoder.mid.attn_1.v.bias"]:
        assert key in keys, key
    # Attention only on the last level by default; none on level 0; no downsample after the last level.
    assert "down.0.attn.0.q.weight" not in keys and "down.2.downsample.conv.weight" not in keys
    assert "decoder.up.0.upsample.conv.weight" not in keys


def test_encoder_options_double_z_attention_levels_and_no_mid_attention():
    enc = Encoder(3, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=5, double_z=True, attn_levels=[0],
                  mid_attn=False, norm_groups=4)
    assert enc(_images(1, 8)).shape == (1, 10, 4, 4)
    keys = set(enc.state_dict())
    assert "down.0.attn.0.q.weight" in keys and not any(k.startswith("down.1.attn") for k in keys)
    assert not any(k.startswith("mid.attn_1") for k in keys)


def test_attention_block_matches_explicit_formula_and_fused_qkv_is_equivalent():
    torch.manual_seed(0)
    blk = AttnBlock(8, fused_qkv=False, norm_groups=4)
    x = torch.randn(2, 8, 3, 5)
    n = blk.norm(x).flatten(2)  # [B, C, HW]
    q, k, v = (F.conv1d(n, m.weight[..., 0], m.bias) for m in (blk.q, blk.k, blk.v))
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 8**-0.5, dim=-1)  # [B, query, key]
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 8, 3, 5)
    want = x + blk.proj_out(out)
    torch.testing.assert_close(blk(x), want, atol=1e-5, rtol=1e-5)
    fused = AttnBlock(8, fused_qkv=True, norm_groups=4)
    sd = {k: v for k, v in blk.state_dict().items() if k.split(".")[0] in ("norm", "proj_out")}
    sd["qkv.weight"] = torch.cat([blk.q.weight, blk.k.weight, blk.v.weight])
    sd["qkv.bias"] = torch.cat([blk.q.bias, blk.k.bias, blk.v.bias])
    fused.load_state_dict(sd)
    torch.testing.assert_close(fused(x), blk(x), atol=1e-6, rtol=1e-6)


def test_downsample_pads_right_and_bottom_only():
    enc = Encoder(3, ch=4, ch_mult=[1, 1], num_res_blocks=1, z_channels=4, norm_groups=4)
    down = enc.down[0].downsample
    x = torch.randn(1, 4, 6, 6)
    want = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    torch.testing.assert_close(down(x), want)
    assert down(x).shape == (1, 4, 3, 3)


def test_autoencoder_rejects_widths_the_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="multiple of norm_groups"):
        Encoder(3, ch=12, ch_mult=[1, 2], norm_groups=32)
    with pytest.raises(ValueError, match="attn_levels"):
        Decoder(3, ch=8, ch_mult=[1, 2], norm_groups=4, attn_levels=[2])


# ---------------------------------------------------------------- quantiser
def test_quantizer_picks_nearest_normalised_code_and_straight_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, l2_norm=True).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = vq(z)
    flat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    codes = F.normalize(vq.embedding.weight.detach(), dim=1)
    want = torch.cdist(flat.double(), codes.double()).argmin(dim=1)
    assert torch.equal(out.indices.flatten(), want)
    torch.testing.assert_close(out.z_q.permute(0, 2, 3, 1).reshape(-1, 4), codes[want])
    # Straight-through: d z_q / d z is the gradient of the normalisation, not zero.
    out.z_q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert 0 < float(out.usage) <= 1 and 1 <= float(out.perplexity) <= 16


def test_quantizer_losses_and_codebook_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, beta=0.5, l2_norm=False).train()
    z = torch.randn(1, 4, 2, 2)
    out = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    q = vq.embedding.weight[out.indices.flatten()]
    torch.testing.assert_close(out.codebook_loss, ((q - flat) ** 2).mean())
    torch.testing.assert_close(out.commit_loss, 0.5 * ((q - flat) ** 2).mean())
    out.codebook_loss.backward()
    assert vq.embedding.weight.grad[out.indices.flatten()].abs().sum() > 0


def test_ema_update_follows_the_formula_and_eval_mode_changes_nothing():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 2, l2_norm=False, ema_decay=0.9)
    vq.embedding.weight.data = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    vq.embed_sum.copy_(vq.embedding.weight)
    z = torch.tensor([[0.9, 0.1], [1.1, -0.1], [0.1, 0.8]]).T.reshape(1, 2, 1, 3)
    before = vq.embedding.weight.clone()
    vq.eval()
    vq(z)
    assert torch.equal(vq.embedding.weight, before) and vq.cluster_size.sum() == 0
    vq.train()
    out = vq(z)
    assert out.indices.flatten().tolist() == [0, 0, 1]
    cluster = 0.1 * torch.tensor([2.0, 1.0, 0.0, 0.0])
    sums = 0.9 * before + 0.1 * torch.tensor([[2.0, 0.0], [0.1, 0.8], [0, 0], [0, 0]])
    smoothed = (cluster + 1e-5) / (cluster.sum() + 4e-5) * cluster.sum()
    torch.testing.assert_close(vq.cluster_size, cluster)
    torch.testing.assert_close(vq.embedding.weight, sums / smoothed[:, None])
    assert float(out.codebook_loss) == 0.0 and not vq.embedding.weight.requires_grad


def test_dead_codes_restart_from_batch_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 3, l2_norm=True, dead_code_threshold=0.5, usage_decay=0.5)
    z = torch.randn(1, 3, 4, 4)
    flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 3), dim=1)
    vq.train()
    before = vq.embedding.weight.detach().clone()
    used = vq(z).indices.unique()  # usage starts at 0: codes this batch leaves unused are re-initialised
    unused = torch.tensor([k for k in range(8) if k not in used.tolist()])
    assert len(unused) > 0
    assert torch.equal(vq.embedding.weight[used], before[used])
    restarted = F.normalize(vq.embedding.weight[unused], dim=1)
    assert torch.cdist(restarted, flat).min(dim=1).values.max() < 1e-5
    assert torch.all(vq.code_usage >= 0.5 * 0.5)
    # A code that keeps being unused is restarted again once its average falls below the threshold.
    vq.embedding.weight.data[5] = torch.tensor([0.0, 0.0, -1.0]) * 1e3
    far = torch.tensor([0.0, 0.0, 1.0]).expand(16, 3).T.reshape(1, 3, 4, 4).contiguous()
    for _ in range(4):
        vq(far)
    assert F.normalize(vq.embedding.weight[5], dim=0)[2] > 0.99
    state = vq.state_dict()
    assert {"embedding.weight", "code_usage"} <= set(state)


# ---------------------------------------------------------------- tokenizer
def test_registry_spec_and_round_trip_shapes():
    assert "vq" in available()
    model = _tiny()
    assert isinstance(model, VQTokenizer)
    spec = model.spec
    assert spec == TokenSpec(kind="index", vocab_size=32, layout=Grid(8, 8))
    x = _images(3)
    tokens = model.encode(x)
    assert tokens.spec == spec and tokens.data.shape == (3, 64, 1) and tokens.data.dtype == torch.long
    assert 0 <= int(tokens.data.min()) and int(tokens.data.max()) < 32
    assert model.decode(tokens).shape == (3, 3, 16, 16)
    emb = model.embed(tokens)
    assert emb.shape == (3, 64, 4)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3, 64))
    # Tokens are row-major over the grid: the token of a position equals the quantiser's index there.
    q = model.quantize_images(x)
    assert torch.equal(tokens.data[..., 0], q.indices.reshape(3, -1))


def test_encode_does_not_touch_training_statistics():
    model = _tiny(dead_code_threshold=0.5).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.encode(_images())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and model.quantize.training


def test_save_and_load_give_identical_encodings(tmp_path):
    model = _tiny(ema_decay=0.9, dead_code_threshold=0.1)
    model.train()
    model(_images(4, seed=1))  # move the EMA and usage buffers away from their init
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = VQTokenizer.from_pretrained(tmp_path).eval()
    x = _images(2, seed=2)
    t1, t2 = model.encode(x), loaded.encode(x)
    assert torch.equal(t1.data, t2.data)
    assert torch.equal(model.decode(t1), loaded.decode(t2))
    assert torch.equal(model.quantize.code_usage, loaded.quantize.code_usage)


def test_straight_through_gradient_reaches_the_encoder():
    model = _tiny().train()
    out = model(_images())
    out["recon"].abs().mean().backward()  # reconstruction only: no commitment term
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert set(out) >= {"loss", "recon", "recon_loss", "codebook_loss", "commit_loss", "indices", "usage",
                        "perplexity"}
    torch.testing.assert_close(out["loss"].detach(), out["recon_loss"] + out["codebook_loss"] + out["commit_loss"])


def test_bad_inputs_raise_clear_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 2"):
        model.encode(torch.zeros(1, 3, 15, 15))
    with pytest.raises(ValueError, match="16x16"):
        model.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.encode(torch.full((1, 3, 16, 16), 1.5))
    with pytest.raises(TypeError, match="float"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="does not match"):
        model.decode(Tokens(torch.zeros(1, 16, 1, dtype=torch.long), TokenSpec(kind="index", vocab_size=32,
                                                                                layout=Grid(4, 4))))
    with pytest.raises(ValueError, match="does not match"):
        model.embed(Tokens(torch.zeros(1, 64, 1, dtype=torch.long), TokenSpec(kind="index", vocab_size=64,
                                                                                layout=Grid(8, 8))))
    with pytest.raises(TypeError, match="Tokens"):
        model.decode(torch.zeros(1, 64, 1, dtype=torch.long))


def _raw_tokens(spec, value):
    """Tokens whose data were corrupted after construction (out-of-range index)."""
    tokens = Tokens(torch.zeros(1, spec.length, 1, dtype=torch.long), spec)
    tokens.data[0, 3, 0] = value
    return tokens


def test_decode_rejects_out_of_range_indices():
    model = _tiny()
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        model.decode(_raw_tokens(model.spec, 32))
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        model.embed(_raw_tokens(model.spec, -1))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="image_size"):
        build("vq", **{**TINY, "image_size": 15})
    with pytest.raises(ValueError, match="recon_loss"):
        build("vq", **{**TINY, "recon_loss": "lpips"})
    with pytest.raises(ValueError, match="decoder_ch_mult"):
        build("vq", **{**TINY, "decoder_ch_mult": [1, 2, 2]})
    with pytest.raises(ValueError, match="ema_decay"):
        build("vq", **{**TINY, "ema_decay": 1.0})


# ---------------------------------------------------------------- metrics
def test_psnr_ssim_and_usage_on_known_inputs():
    x = _images(2, 16)
    y = (x + 0.2).clamp(-1, 1)
    mse = (((x + 1) / 2 - (y + 1) / 2) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(psnr(y, x), 10 * torch.log10(1 / mse))
    assert torch.allclose(ssim(x, x), torch.ones(2))
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert float(ssim(noisy, x).max()) < float(ssim(y, x).min()) < 1
    stats = code_usage(torch.tensor([4, 4, 0, 0]))
    assert stats["codebook_usage"] == 0.5 and math.isclose(stats["perplexity"], 2.0)


def test_evaluate_reconstruction_counts_every_token():
    model = _tiny()
    data = [{"image": img} for img in _images(5)]
    metrics = evaluate_reconstruction(model, data, batch_size=2, progress=False)
    tokens = model.encode(torch.stack([d["image"] for d in data])).data.flatten()
    assert metrics["num_images"] == 5
    assert math.isclose(metrics["codebook_usage"], tokens.unique().numel() / 32)
    assert math.isfinite(metrics["psnr"]) and -1 <= metrics["ssim"] <= 1


# ---------------------------------------------------------------- training
def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 10, 110, 0.1) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=1e-3)


def test_short_training_reduces_reconstruction_loss(tmp_path):
    from tokenloom.data.shapes import ShapesDataset
    from tokenloom.training.tokenizer_trainer import cache_images

    torch.manual_seed(0)
    model = build("vq", **{**TINY, "dead_code_threshold": 0.1})
    data = cache_images(ShapesDataset("train", image_size=16, num_samples=256), progress=False)
    config = TrainConfig(max_steps=60, batch_size=16, lr=3e-3, warmup_steps=5, log_every=10, progress=False,
                         output_dir=str(tmp_path), seed=0)
    result = train_tokenizer(model, data, config)
    first, last = result.history[0]["recon_loss"], result.history[-1]["recon_loss"]
    assert result.steps == 60 and result.stopped_by == "steps"
    assert last < 0.5 * first, (first, last)
    reloaded = VQTokenizer.from_pretrained(tmp_path)
    x = data.tensors[0][:4]
    assert torch.equal(reloaded.encode(x).data, model.eval().encode(x).data)


@pytest.mark.slow
def test_recipe_meets_psnr_and_usage_bars(tmp_path):
    import yaml

    from tokenloom.training.tokenizer_trainer import train_from_config

    with open(RECIPE) as f:
        cfg = yaml.safe_load(f)
    out = train_from_config(cfg, output_dir=str(tmp_path), progress=False)
    metrics = out["eval"]
    print(metrics)
    assert metrics["psnr"] >= 25.0, metrics
    assert metrics["codebook_usage"] >= 0.8, metrics


def test_time_budget_stops_the_loop_and_config_is_validated():
    model = _tiny()
    data = torch.utils.data.TensorDataset(_images(8))
    result = train_tokenizer(model, data, TrainConfig(max_steps=50, batch_size=4, max_minutes=1e-9, progress=False))
    assert result.steps == 1 and result.stopped_by == "time" and result.cpu_minutes > 0
    with pytest.raises(ValueError, match="budget_clock"):
        TrainConfig(budget_clock="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train_tokenizer(model, data, TrainConfig(batch_size=16, progress=False))


def test_training_script_runs_a_yaml_recipe(tmp_path):
    import runpy

    import yaml

    recipe = {
        "tokenizer": {"name": "vq", **TINY},
        "data": {"name": "shapes", "split": "train", "image_size": 16, "num_samples": 32},
        "eval_data": {"name": "shapes", "split": "test", "image_size": 16, "num_samples": 8},
        "train": {"max_steps": 100, "batch_size": 8, "threads": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    script = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "scripts", "train_tokenizer.py"))
    out_dir = tmp_path / "out"
    summary = script["main"](["--config", str(path), "--output-dir", str(out_dir), "train.max_steps=3",
                              "--no-progress"])
    assert summary["train_steps"] == 3 and summary["eval"]["num_images"] == 8
    assert {"config.json", "train_log.json", "eval.json"} <= set(os.listdir(out_dir))
    assert VQTokenizer.from_pretrained(out_dir).spec == build("vq", **TINY).spec


def test_same_seed_gives_the_same_trained_model():
    data = torch.utils.data.TensorDataset(_images(16, seed=5))
    states = []
    for _ in range(2):
        model = _tiny(dead_code_threshold=0.1)
        train_tokenizer(model, data, TrainConfig(max_steps=5, batch_size=4, progress=False, seed=3))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
