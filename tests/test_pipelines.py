"""Pipelines: task registry, save → load round trips, seeds, output types and bad input."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

import tokenloom
from tokenloom.conditioning.openclip_text import OpenCLIPTextConditioner
from tokenloom.generators.raster_ar import RasterAR
from tokenloom.pipelines.class_to_image import ClassToImagePipeline
from tokenloom.pipelines.text_to_image import TextToImagePipeline
from tokenloom.tokenizers.vq import VQTokenizer

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a white circle"]


def tiny_vq():
    torch.manual_seed(0)
    return VQTokenizer(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                       codebook_size=16, codebook_dim=4).eval()


def tiny_ar(spec, **cond):
    torch.manual_seed(1)
    model = RasterAR(token_spec=spec.to_dict(), width=32, depth=2, num_heads=2, multiple_of=16, **cond).eval()
    for p in model.output_head.parameters():  # the head starts at zero: give it a real distribution
        torch.nn.init.normal_(p, std=0.5)
    return model


@pytest.fixture(scope="module")
def t2i():
    vq = tiny_vq()
    text = OpenCLIPTextConditioner.for_captions(CAPTIONS, width=32, heads=2, layers=1, context_length=12).eval()
    ar = tiny_ar(vq.spec, condition="text", cond_dim=32, cond_len=12)
    return TextToImagePipeline(vq, ar, text, sampling_defaults={"guidance_scale": 2.0, "top_k": 8})


@pytest.fixture(scope="module")
def c2i():
    vq = tiny_vq()
    return ClassToImagePipeline(vq, tiny_ar(vq.spec, condition="class", num_classes=5))


@pytest.fixture(scope="module")
def t2i_dir(t2i, tmp_path_factory):
    path = tmp_path_factory.mktemp("t2i")
    t2i.save_pretrained(path)
    return path


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_tasks_registered():
    assert {"text-to-image", "class-to-image"} <= set(tokenloom.pipelines.tasks())


def test_output_types(t2i):
    t2i.set_progress_bar_config(disable=True)
    pil = t2i("a red circle", generator=seeded(0)).images
    assert len(pil) == 1 and pil[0].size == (8, 8)
    arr = t2i("a red circle", generator=seeded(0), output_type="np").images
    assert arr.shape == (1, 8, 8, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    pt = t2i("a red circle", generator=seeded(0), output_type="pt").images
    assert pt.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(np.asarray(pil[0]) / 255.0, arr[0], atol=1 / 255)
    out = t2i("a red circle", generator=seeded(0), output_type="tokens")
    assert out.images is None and out.tokens.spec == t2i.image_tokenizer.spec
    images, tokens = t2i("a red circle", generator=seeded(0), output_type="pt", return_dict=False)
    assert torch.equal(images, pt)


def test_same_seed_same_image_and_different_seed_differs(t2i):
    a = t2i("a red circle", generator=seeded(3), output_type="tokens").tokens.data
    b = t2i("a red circle", generator=seeded(3), output_type="tokens").tokens.data
    c = t2i("a red circle", generator=seeded(4), output_type="tokens").tokens.data
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_does_not_depend_on_batch_mates(t2i):
    alone = t2i("a red circle", generator=seeded(7), output_type="tokens").tokens.data
    gens = [seeded(7), seeded(8), seeded(9), seeded(7)]
    batch = t2i(["a red circle", "two blue squares", "a green triangle", "a red circle"], generator=gens,
                output_type="tokens").tokens.data
    assert torch.equal(batch[0], alone[0]) and torch.equal(batch[3], alone[0])
    # a single generator is split into per-image seeds: the first image matches the same seed alone
    first = t2i(["a red circle", "two blue squares"], generator=seeded(7), output_type="tokens").tokens.data
    assert torch.equal(first[0], alone[0])


def test_num_images_per_prompt_and_negative_prompt(t2i):
    out = t2i(["a red circle", "two blue squares"], num_images_per_prompt=3, generator=seeded(0),
              output_type="tokens").tokens
    assert out.batch_size == 6
    neg = t2i("a red circle", negative_prompt="a green triangle", generator=seeded(0), output_type="tokens")
    plain = t2i("a red circle", generator=seeded(0), output_type="tokens")
    assert neg.tokens.batch_size == 1 and not torch.equal(neg.tokens.data, plain.tokens.data)


def test_round_trip_through_both_loading_routes(t2i, t2i_dir):
    ref = t2i(["a red circle", "two blue squares"], generator=seeded(5), output_type="pt").images
    loaded = tokenloom.pipeline("text-to-image", model=str(t2i_dir))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, TextToImagePipeline)
    assert torch.equal(loaded(["a red circle", "two blue squares"], generator=seeded(5), output_type="pt").images,
                       ref)
    again = TextToImagePipeline.from_pretrained(str(t2i_dir))
    again.set_progress_bar_config(disable=True)
    assert torch.equal(again(["a red circle", "two blue squares"], generator=seeded(5), output_type="pt").images,
                       ref)
    assert loaded.sampling_params() == t2i.sampling_params()
    assert tokenloom.load(str(t2i_dir)).__class__ is TextToImagePipeline


def test_class_to_image(c2i, tmp_path):
    c2i.set_progress_bar_config(disable=True)
    out = c2i([0, 4], num_images_per_prompt=2, generator=seeded(0), output_type="pt")
    assert out.images.shape == (4, 3, 8, 8)
    c2i.save_pretrained(tmp_path)
    loaded = tokenloom.pipeline("class-to-image", model=str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded([0, 4], num_images_per_prompt=2, generator=seeded(0), output_type="pt").images,
                       out.images)
    with pytest.raises(ValueError, match="class_labels"):
        c2i([5])
    with pytest.raises(TypeError, match="class_labels"):
        c2i("cat")


# ---------------------------------------------------------------- bad input, one test each
def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'text-to-imag'.*did you mean 'text-to-image'"):
        tokenloom.pipeline("text-to-imag", model="anything")


def test_prompt_not_a_string(t2i):
    with pytest.raises(TypeError, match="prompt"):
        t2i(42)
    with pytest.raises(TypeError, match="prompt"):
        t2i(["a red circle", 3])


def test_empty_prompt_list(t2i):
    with pytest.raises(ValueError, match="non-empty"):
        t2i([])


def test_bad_count_and_output_type(t2i):
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        t2i("a red circle", num_images_per_prompt=-1)
    with pytest.raises(ValueError, match="output_type"):
        t2i("a red circle", output_type="jpeg")


def test_bad_sampling_setting_names_the_argument(t2i):
    with pytest.raises(ValueError, match="top_p"):
        t2i("a red circle", top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        t2i("a red circle", temperature=-1.0)


def test_folder_for_another_task(t2i_dir):
    with pytest.raises(ValueError, match="TextToImagePipeline"):
        tokenloom.pipeline("class-to-image", model=str(t2i_dir))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        tokenloom.pipeline("text-to-image", model=str(tmp_path))


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_folder_with_missing_weights(t2i_dir, tmp_path):
    path = _copy(t2i_dir, tmp_path / "broken")
    weights = path / "token_generator" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, weights)
    with pytest.raises(ValueError, match="missing keys.*" + dropped.replace(".", r"\.")):
        tokenloom.pipeline("text-to-image", model=str(path))


def test_folder_with_misshaped_weights(t2i_dir, tmp_path):
    path = _copy(t2i_dir, tmp_path / "broken")
    cfg_path = path / "token_generator" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["width"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        tokenloom.pipeline("text-to-image", model=str(path))


def test_mismatched_components_fail_at_construction(t2i):
    other = VQTokenizer(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                        codebook_size=16, codebook_dim=4)
    with pytest.raises(ValueError, match="spec"):
        TextToImagePipeline(other, t2i.token_generator, t2i.conditioner)


def test_diffusers_generic_loader_reads_the_folder(t2i, t2i_dir):
    import tokenloom.components  # noqa: F401  (diffusers loads only imported component libraries)

    pipe = DiffusionPipeline.from_pretrained(str(t2i_dir), trust_remote_code=True)
    assert isinstance(pipe, TextToImagePipeline)
