"""Published-checkpoint pipelines: ``tokenloom convert llamagen|var|mar`` on the tiny fixtures, then sampling.

Fixtures are read at run time from ``$TOKENLOOM_FIXTURES`` (default ``../shared/fixtures``) and
``tests/fixtures/alt_sizes``: ``llamagen/{vq,gpt}``, ``var/{vqvae,var}``, ``mar/{vae,mar}``, each a checkpoint +
``config.json`` (+ ``io.safetensors``). Every size is read from the fixture files, so fixture sets of other sizes run
unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tokenloom
from tokenloom.cli import main
from tokenloom.config import GuidanceSchedule
from tokenloom.interop.llamagen import (
    LLAMAGEN_GPT_PRESETS,
    LLAMAGEN_VQ_PRESETS,
    gpt_args_from_checkpoint,
    llamagen_sampling_params,
    vq_args_from_checkpoint,
)
from tokenloom.tokens import Tokens

ROOTS = {"env": Path(os.environ["TOKENLOOM_FIXTURES"]), "alt_sizes": Path(__file__).parent / "fixtures" / "alt_sizes"}


def checkpoint_in(folder: Path) -> Path:
    """The fixture's checkpoint: config.json's ``checkpoint.file``, else the folder's only ``.pt/.pth/.ckpt``."""
    config = json.loads((folder / "config.json").read_text())
    name = (config.get("checkpoint") or {}).get("file")
    if name:
        return folder / name
    found = [p for p in folder.iterdir() if p.suffix in (".pt", ".pth", ".ckpt")]
    assert len(found) == 1, f"{folder} must hold one checkpoint, found {found}"
    return found[0]


def needs(*folders: str):
    """Parametrize ``root`` over the fixture roots; a root without all of ``folders`` skips."""
    params = []
    for name, root in ROOTS.items():
        missing = [f for f in folders if not (root / f / "config.json").is_file()]
        params.append(pytest.param(root, id=name, marks=pytest.mark.skipif(
            bool(missing), reason=f"fixtures {missing} not found under {root}")))
    return pytest.mark.parametrize("root", params)


def _two_labels(generator) -> list[int]:
    """Two valid class labels of the converted model (its classes come from the checkpoint)."""
    n = generator.config.num_classes
    return [min(1, n - 1), n - 1]


def _tol(ref: torch.Tensor) -> float:
    return 2e-5 * max(1.0, float(ref.abs().max()))  # the fixtures README's acceptance bound


def _convert(tmp_path: Path, *argv: str) -> Path:
    out = tmp_path / "pipe"
    assert main(["convert", *argv, "--out", str(out)]) == 0
    assert (out / "model_index.json").is_file()
    return out


def _load(folder: Path):
    pipe = tokenloom.pipeline("class-to-image", model=str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _record_guided_steps(generator) -> list[bool]:
    """Wrap ``generator.output_head.sample`` to record, per token step, whether it received unconditional input."""
    calls, sample = [], generator.output_head.sample

    def spy(z, params, gen=None, z_uncond=None):
        calls.append(z_uncond is not None and params.guidance_scale != 1.0)
        return sample(z, params, gen, z_uncond=z_uncond)

    generator.output_head.sample = spy
    return calls


# ---------------------------------------------------------------- LlamaGen sampling conventions
@pytest.mark.parametrize("cfg_interval,length", [(-1, 16), (0, 16), (3, 16), (13, 16), (14, 16), (100, 16), (5, 256)])
def test_cfg_interval_guides_the_same_tokens_as_llamagen(cfg_interval, length):
    params = llamagen_sampling_params(cfg_scale=4.0, cfg_interval=cfg_interval, num_tokens=length)
    guided = [t for t in range(length) if params.at_step(t, length).guidance_scale == 4.0]
    unguided = [t for t in range(length) if params.at_step(t, length).guidance_scale == 1.0]
    # LlamaGen: the prefill token (t = 0) is guided, then decode step i (token i + 1) while i <= cfg_interval.
    want = list(range(length)) if cfg_interval == -1 else [t for t in range(length) if t == 0 or t - 1 <= cfg_interval]
    assert guided == want and sorted(guided + unguided) == list(range(length))


def test_llamagen_sampling_conventions():
    p = llamagen_sampling_params(cfg_scale=2.0, top_k=2000, top_p=0.9, temperature=0.7, vocab_size=16384)
    assert (p.guidance_scale, p.top_k, p.top_p, p.temperature) == (2.0, 2000, 0.9, 0.7)
    assert p.guidance_schedule == GuidanceSchedule.constant()
    assert llamagen_sampling_params(top_k=2000, vocab_size=128).top_k == 0  # top_k >= V keeps everything
    assert llamagen_sampling_params(cfg_scale=0.5).guidance_scale == 1.0  # LlamaGen guides only when cfg_scale > 1
    assert not llamagen_sampling_params(cfg_scale=1.0, cfg_interval=3).uses_guidance  # no num_tokens needed
    zero_p = llamagen_sampling_params(top_k=0, top_p=0.0)
    assert (zero_p.top_k, zero_p.top_p) == (1, 1.0)  # LlamaGen's filter keeps one token
    assert llamagen_sampling_params(temperature=0.0).temperature == 0.0  # greedy in both
    with pytest.raises(ValueError, match="num_tokens"):
        llamagen_sampling_params(cfg_scale=4.0, cfg_interval=3)
    with pytest.raises(ValueError, match="top_p"):
        llamagen_sampling_params(top_p=1.5)
    with pytest.raises(ValueError, match="cfg_interval"):
        llamagen_sampling_params(cfg_interval=-2)
    with pytest.raises(ValueError, match="temperature"):
        llamagen_sampling_params(temperature=-1.0)


def test_presets_are_llamagens_published_sizes():
    sizes = {k: (v["dim"], v["n_layer"], v["n_head"]) for k, v in LLAMAGEN_GPT_PRESETS.items()}
    assert sizes == {"GPT-B": (768, 12, 12), "GPT-L": (1024, 24, 16), "GPT-XL": (1280, 36, 20),
                     "GPT-XXL": (1536, 48, 24), "GPT-3B": (3200, 24, 32)}
    assert LLAMAGEN_VQ_PRESETS["VQ-16"]["encoder_ch_mult"] == [1, 1, 2, 2, 4]
    assert LLAMAGEN_VQ_PRESETS["VQ-16"]["codebook_size"] == 16384


@needs("llamagen/vq", "llamagen/gpt")
def test_llamagen_sizes_come_from_the_checkpoints(root):
    vq_dir, gpt_dir = root / "llamagen" / "vq", root / "llamagen" / "gpt"
    vq_cfg = json.loads((vq_dir / "config.json").read_text())
    vq_sd = torch.load(checkpoint_in(vq_dir), weights_only=True)["model"]
    args, ed = vq_args_from_checkpoint(vq_sd)  # nothing but the checkpoint
    for key in ("codebook_size", "codebook_embed_dim", "encoder_ch_mult", "decoder_ch_mult", "z_channels"):
        assert args[key] == vq_cfg["ModelArgs"][key], key
    assert (ed["ch"], ed["num_res_blocks"]) == tuple(vq_cfg["encoder_decoder_overrides"][k]
                                                     for k in ("ch", "num_res_blocks"))
    with pytest.raises(ValueError, match="codebook_size"):
        vq_args_from_checkpoint(vq_sd, {"codebook_size": vq_cfg["ModelArgs"]["codebook_size"] + 1})

    gpt_cfg = json.loads((gpt_dir / "config.json").read_text())["ModelArgs"]
    gpt_sd = torch.load(checkpoint_in(gpt_dir), weights_only=True)["model"]
    got = gpt_args_from_checkpoint(gpt_sd, {"n_head": gpt_cfg["n_head"], "block_size": gpt_cfg["block_size"]})
    for key in ("dim", "n_layer", "vocab_size", "num_classes", "n_head", "block_size"):
        assert got[key] == gpt_cfg[key], key
    with pytest.raises(ValueError, match="n_head"):  # a tiny model matches no published size
        gpt_args_from_checkpoint(gpt_sd)
    with pytest.raises(ValueError, match="n_layer"):
        gpt_args_from_checkpoint(gpt_sd, {**gpt_cfg, "n_layer": gpt_cfg["n_layer"] + 1})


# ---------------------------------------------------------------- convert → load → sample
@needs("llamagen/vq", "llamagen/gpt")
@torch.no_grad()
def test_llamagen_cli_pipeline_samples_with_llamagens_settings(root, tmp_path):
    vq_dir, gpt_dir = root / "llamagen" / "vq", root / "llamagen" / "gpt"
    out = _convert(tmp_path, "llamagen", "--vq", str(checkpoint_in(vq_dir)), "--gpt", str(checkpoint_in(gpt_dir)),
                   "--vq-config", str(vq_dir / "config.json"), "--gpt-config", str(gpt_dir / "config.json"),
                   "--cfg-scale", "3.0", "--cfg-interval", "2", "--top-k", "50", "--top-p", "0.9",
                   "--temperature", "0.8")
    pipe = _load(out)
    gen = pipe.token_generator
    length = gen.spec.length
    params = pipe.sampling_params()
    assert (params.guidance_scale, params.top_p, params.temperature) == (3.0, 0.9, 0.8)
    assert params.top_k == (50 if gen.spec.vocab_size > 50 else 0)
    assert params.guidance_schedule == llamagen_sampling_params(3.0, 2, num_tokens=length).guidance_schedule

    io_path = gpt_dir / "io.safetensors"
    if io_path.is_file():  # the saved and reloaded GPT still reproduces LlamaGen's logits
        from safetensors.torch import load_file

        io = load_file(str(io_path))
        logits = gen(Tokens(io["codes"][..., None], gen.spec), io["labels"])["logits"][:, :, 0]
        assert (logits - io["logits"]).abs().max() <= _tol(io["logits"])

    guided = _record_guided_steps(gen)
    labels = _two_labels(gen)
    images = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    side = gen.spec.layout.h * pipe.image_tokenizer.downsample_factor
    assert images.shape == (2, 3, side, side) and torch.isfinite(images).all()
    assert guided == [t <= 2 + 1 for t in range(length)]  # tokens 0 … cfg_interval + 1 are guided
    again = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(images, again)


@needs("var/vqvae", "var/var")
@torch.no_grad()
def test_var_cli_pipeline_samples_with_vars_settings(root, tmp_path):
    from tokenloom.interop.var import convert_var, var_sampling_params

    vae_dir, var_dir = root / "var" / "vqvae", root / "var" / "var"
    out = _convert(tmp_path, "var", "--vae", str(checkpoint_in(vae_dir)), "--var", str(checkpoint_in(var_dir)),
                   "--vae-config", str(vae_dir / "config.json"), "--var-config", str(var_dir / "config.json"),
                   "--cfg", "2.0", "--top-k", "10", "--top-p", "0")
    pipe = _load(out)
    gen = pipe.token_generator
    assert pipe.sampling_params() == var_sampling_params(2.0, 10, 0.0, vocab_size=gen.spec.vocab_size)
    direct = convert_var(checkpoint_in(var_dir), var_dir / "config.json").state_dict()
    loaded = gen.state_dict()
    assert set(direct) == set(loaded) and all(torch.equal(direct[k], loaded[k]) for k in direct)

    labels = _two_labels(gen)
    images = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    side = gen.spec.layout.sizes[-1][0] * pipe.image_tokenizer.downsample_factor
    assert images.shape == (2, 3, side, side) and torch.isfinite(images).all()
    again = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(images, again)


@needs("mar/vae", "mar/mar")
@torch.no_grad()
def test_mar_cli_pipeline_samples_with_mars_settings(root, tmp_path):
    from tokenloom.generators.masked_ar_layers import mar_guidance_values
    from tokenloom.interop.mar import convert_mar

    vae_dir, mar_dir = root / "mar" / "vae", root / "mar" / "mar"
    out = _convert(tmp_path, "mar", "--vae", str(checkpoint_in(vae_dir)), "--mar", str(checkpoint_in(mar_dir)),
                   "--vae-config", str(vae_dir / "config.json"), "--mar-config", str(mar_dir / "config.json"),
                   "--cfg", "2.5", "--num-iter", "2", "--temperature", "0.9")
    pipe = _load(out)
    gen = pipe.token_generator
    params = pipe.sampling_params()
    assert params.num_steps == 2 and params.guidance_scale == 2.5
    assert list(params.guidance_schedule.values) == mar_guidance_values(2.5, gen.seq_len, 2)
    assert gen.output_head.noise_temperature == pytest.approx(0.9)
    direct = convert_mar(checkpoint_in(mar_dir), mar_dir / "config.json").state_dict()
    loaded = gen.state_dict()
    assert set(direct) == set(loaded) and all(torch.equal(direct[k], loaded[k]) for k in direct)

    labels = _two_labels(gen)
    images = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    side = gen.spec.layout.h * pipe.image_tokenizer.downsample_factor
    assert images.shape == (2, 3, side, side) and torch.isfinite(images).all()
    again = pipe(labels, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(images, again)
