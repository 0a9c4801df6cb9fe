"""Every text conditioner drives the same TextToImagePipeline, saves inside its folder and loads back through
``tokenloom.pipeline`` and diffusers' generic loader with the same images for the same seed."""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from test_conditioning_openclip import tiny_openclip_folder
from test_conditioning_transformers import tiny_clip_folder, tiny_t5_folder

import tokenloom
import tokenloom.components  # noqa: F401  (diffusers loads only imported component libraries)
from tokenloom.conditioning.openclip_pretrained import OpenCLIPTextEncoder
from tokenloom.conditioning.openclip_text import OpenCLIPTextConditioner
from tokenloom.conditioning.transformers_text import TransformersTextConditioner
from tokenloom.generators.raster_ar import RasterAR
from tokenloom.pipelines.text_to_image import TextToImagePipeline
from tokenloom.tokenizers.vq import VQTokenizer

PROMPTS = ["a red circle", "two blue squares", "a green triangle above a white circle"]
CONDITIONERS = ["openclip_text", "openclip_pretrained", "openclip_pretrained_pooled", "t5", "t5_reference",
                "clip_penultimate", "clip_pooled"]


def make_conditioner(kind: str, root):
    if kind == "openclip_text":
        torch.manual_seed(0)
        return OpenCLIPTextConditioner.for_captions(PROMPTS, width=16, heads=2, layers=1, context_length=12).eval()
    if kind.startswith("openclip_pretrained"):
        tiny_openclip_folder(root / "openclip")
        output = "pooled" if kind.endswith("pooled") else "tokens"
        return OpenCLIPTextEncoder(pretrained=str(root / "openclip"), context_length=10, output=output)
    if kind.startswith("t5"):
        tiny_t5_folder(root / "t5")
        mode = "reference" if kind.endswith("reference") else "copy"
        return TransformersTextConditioner(pretrained=str(root / "t5"), context_length=10, save_mode=mode)
    tiny_clip_folder(root / "clip")
    if kind == "clip_pooled":
        return TransformersTextConditioner(pretrained=str(root / "clip"), output="pooled")
    return TransformersTextConditioner(pretrained=str(root / "clip"), hidden_layer=-2)


def make_pipeline(conditioner) -> TextToImagePipeline:
    torch.manual_seed(0)
    vq = VQTokenizer(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                     codebook_size=16, codebook_dim=4).eval()
    torch.manual_seed(1)
    ar = RasterAR(token_spec=vq.spec.to_dict(), width=32, depth=1, num_heads=2, multiple_of=16, condition="text",
                  cond_dim=conditioner.feature_dim, cond_len=conditioner.feature_length).eval()
    for p in ar.output_head.parameters():  # the head starts at zero: give it a real distribution
        torch.nn.init.normal_(p, std=0.5)
    pipe = TextToImagePipeline(vq, ar, conditioner, sampling_defaults={"guidance_scale": 2.0})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompts=PROMPTS, **kw):
    out = pipe(prompts, generator=torch.Generator().manual_seed(7), output_type="tokens", **kw)
    return out.tokens.data


@pytest.mark.parametrize("kind", CONDITIONERS)
def test_pipeline_runs_saves_and_loads_with_each_conditioner(kind, tmp_path):
    pipe = make_pipeline(make_conditioner(kind, tmp_path))
    tokens = sample(pipe)
    assert tokens.shape[0] == 3
    negative = sample(pipe, negative_prompt="a white square")
    assert negative.shape == tokens.shape

    pipe.save_pretrained(tmp_path / "pipe")
    saved = json.loads((tmp_path / "pipe" / "conditioner" / "config.json").read_text())
    if kind == "t5_reference":  # the encoder stays where it was; the folder points at it
        assert saved["pretrained"] == str((tmp_path / "t5").resolve())
    for loaded in (tokenloom.pipeline("text-to-image", model=str(tmp_path / "pipe")),
                   DiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), trust_remote_code=True)):
        assert type(loaded.conditioner) is type(pipe.conditioner)
        loaded.set_progress_bar_config(disable=True)
        assert torch.equal(sample(loaded), tokens)
        assert torch.equal(sample(loaded, negative_prompt="a white square"), negative)


def test_copied_encoder_folder_survives_the_original(tmp_path):
    """With save_mode="copy" the pipeline folder holds the encoder: deleting the source folder does not matter."""
    import shutil

    pipe = make_pipeline(make_conditioner("t5", tmp_path))
    tokens = sample(pipe)
    pipe.save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "t5")
    assert torch.equal(sample(tokenloom.pipeline("text-to-image", model=str(tmp_path / "pipe"))), tokens)


def test_referenced_encoder_that_disappeared_is_a_clear_error(tmp_path):
    import shutil

    pipe = make_pipeline(make_conditioner("t5_reference", tmp_path))
    pipe.save_pretrained(tmp_path / "pipe")
    shutil.rmtree(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"pretrained path '.*t5' does not exist"):
        tokenloom.pipeline("text-to-image", model=str(tmp_path / "pipe"))
