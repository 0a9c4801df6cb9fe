"""The generation and editing tasks on tiny untrained models: known tokens kept exactly, seeds, batches, outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_tiny import NUM_CLASSES, components, half_mask, images, seeded, tiny_generator, tiny_vq

import tokenloom
from tokenloom.pipelines.images import known_token_mask, load_masks
from tokenloom.pipelines.inpainting import InpaintingPipeline, OutpaintingPipeline
from tokenloom.pipelines.reconstruction import ImageReconstructionPipeline
from tokenloom.pipelines.unconditional import UnconditionalImagePipeline
from tokenloom.pipelines.variation import ImageVariationPipeline
from tokenloom.tokens import Grid, Scales, Sequence, TokenSpec

FAMILIES = ("random_order", "masked", "next_scale")
ALL_TASKS = {"text-to-image", "class-to-image", "unconditional-image-generation", "image-reconstruction",
             "image-inpainting", "image-outpainting", "image-variation"}


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def parts(family):
    return components(family)


def encoded(tokenizer, x01: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tokenizer.encode(x01 * 2 - 1).data


def test_every_task_is_registered():
    assert ALL_TASKS <= set(tokenloom.pipelines.tasks())


# ---------------------------------------------------------------- token masks
def test_a_token_is_known_only_when_its_whole_patch_is_kept():
    spec = TokenSpec(kind="index", vocab_size=4, layout=Grid(4, 4))
    repaint = torch.zeros(1, 8, 8, dtype=torch.bool)
    repaint[0, 3, 5] = True  # one pixel in token (1, 2)
    known = known_token_mask(repaint, spec).view(4, 4)
    expected = torch.ones(4, 4, dtype=torch.bool)
    expected[1, 2] = False
    assert torch.equal(known, expected)


def test_scales_token_mask_uses_each_scales_patches():
    spec = TokenSpec(kind="index", vocab_size=4, layout=Scales(((1, 1), (2, 2), (3, 3), (4, 4))))
    repaint = load_masks(half_mask())
    known = known_token_mask(repaint, spec)[0]
    # scale 1: unknown; 2x2: left column; 3x3: only the first column lies wholly in the left half; 4x4: left half
    assert known[:1].sum() == 0 and known[1:5].tolist() == [True, False, True, False]
    assert known[5:14].view(3, 3)[:, 0].all() and not known[5:14].view(3, 3)[:, 1:].any()
    assert torch.equal(known[14:].view(4, 4), torch.tensor([[True, True, False, False]] * 4))


def test_masks_accept_pil_numpy_and_tensors_white_means_repaint():
    arr = (half_mask().numpy() * 255).astype(np.uint8)
    from_pil = load_masks(Image.fromarray(arr))
    from_np = load_masks(arr.astype(bool))
    from_pt = load_masks(half_mask()[None, None])
    assert torch.equal(from_pil, from_np) and torch.equal(from_np, from_pt)
    assert from_pil[0, 0, 7] and not from_pil[0, 0, 0]


def test_1d_layouts_cannot_be_edited():
    spec = TokenSpec(kind="index", vocab_size=4, layout=Sequence(8))
    with pytest.raises(ValueError, match="Grid or Scales"):
        known_token_mask(torch.zeros(1, 8, 8, dtype=torch.bool), spec)


# ---------------------------------------------------------------- inpainting
def test_inpainting_keeps_every_known_token(parts):
    tok, gen, _ = parts
    pipe = quiet(InpaintingPipeline(tok, gen))
    x = images(2)
    masks = [half_mask(), 1 - half_mask()]  # different masks per image
    out = pipe(x, masks, class_labels=[1, 3], num_images_per_prompt=2, generator=seeded(0, 1, 2, 3),
               output_type="pt")
    assert out.images.shape == (4, 3, 8, 8)
    known = encoded(tok, x).repeat_interleave(2, 0)
    km = out.known_mask
    assert km.shape == (4, tok.spec.length) and km.any(1).all() and (~km).any(1).all()
    assert torch.equal(out.tokens.data[km], known[km])
    expected = known_token_mask(load_masks(masks), tok.spec).repeat_interleave(2, 0)
    assert torch.equal(km, expected)


def test_inpainting_same_seed_same_image_and_no_dependence_on_batch_mates(parts):
    tok, gen, _ = parts
    pipe = quiet(InpaintingPipeline(tok, gen))
    x = images(4, seed=1)
    alone = pipe(x[:1], half_mask(), class_labels=2, generator=seeded(7), output_type="tokens").tokens.data
    again = pipe(x[:1], half_mask(), class_labels=2, generator=seeded(7), output_type="tokens").tokens.data
    assert torch.equal(alone, again)
    corner = torch.zeros(8, 8)
    corner[:4, :4] = 1
    batch = pipe(x, [half_mask(), corner, half_mask(), corner], class_labels=[2, 0, 4, 1],
                 generator=seeded(7, 8, 9, 10), output_type="tokens").tokens.data
    assert torch.equal(batch[0], alone[0])


def test_inpainting_with_a_text_prompt_and_negative_prompt():
    tok, gen, text = components("random_order", condition="text")
    pipe = quiet(InpaintingPipeline(tok, gen, text, sampling_defaults={"guidance_scale": 2.0}))
    x = images(1)
    out = pipe(x, half_mask(), prompt=["a red circle", "two blue squares"], negative_prompt="a green triangle",
               generator=seeded(0, 1), output_type="tokens")
    known = encoded(tok, x).expand(2, -1, -1)
    assert torch.equal(out.tokens.data[out.known_mask], known[out.known_mask])
    with pytest.raises(ValueError, match="prompt is required"):
        pipe(x, half_mask())
    with pytest.raises(ValueError, match="class_labels"):
        pipe(x, half_mask(), prompt="a red circle", class_labels=1)


def test_inpainting_with_an_unconditional_generator():
    tok, gen, _ = components("masked", condition="none")
    pipe = quiet(InpaintingPipeline(tok, gen))
    x = images(2)
    out = pipe(x, half_mask(), num_images_per_prompt=2, generator=seeded(0, 1, 2, 3), output_type="tokens")
    known = encoded(tok, x).repeat_interleave(2, 0)
    assert torch.equal(out.tokens.data[out.known_mask], known[out.known_mask])
    with pytest.raises(ValueError, match="prompt and negative_prompt need a text-conditioned generator"):
        pipe(x, half_mask(), prompt="a red circle")
    with pytest.raises(ValueError, match="guidance needs a conditional generator"):
        pipe(x, half_mask(), guidance_scale=2.0)


def test_output_types_follow_diffusers(parts):
    tok, gen, _ = parts
    pipe = quiet(InpaintingPipeline(tok, gen))
    x = images(1)
    pil = pipe(x, half_mask(), class_labels=1, generator=seeded(0)).images
    arr = pipe(x, half_mask(), class_labels=1, generator=seeded(0), output_type="np").images
    pt = pipe(x, half_mask(), class_labels=1, generator=seeded(0), output_type="pt").images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (8, 8)
    assert arr.shape == (1, 8, 8, 3) and pt.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(np.asarray(pil[0]) / 255.0, arr[0], atol=1 / 255)
    images_, tokens = pipe(x, half_mask(), class_labels=1, generator=seeded(0), output_type="pt", return_dict=False)
    assert torch.equal(images_, pt) and tokens.batch_size == 1


def test_pil_image_input_equals_tensor_input():
    tok, gen, _ = components("random_order")
    pipe = quiet(InpaintingPipeline(tok, gen))
    arr = (images(1)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    from_pil = pipe(Image.fromarray(arr), half_mask(), class_labels=0, generator=seeded(3), output_type="tokens")
    from_pt = pipe(torch.from_numpy(arr).permute(2, 0, 1).float() / 255, half_mask(), class_labels=0,
                   generator=seeded(3), output_type="tokens")
    assert torch.equal(from_pil.tokens.data, from_pt.tokens.data)


# ---------------------------------------------------------------- outpainting and variation
def test_outpainting_keeps_the_placed_image(parts):
    tok, gen, _ = parts
    pipe = quiet(OutpaintingPipeline(tok, gen))
    small = images(1)[:, :, :4, :4]
    out = pipe(small, offset=(2, 2), class_labels=4, generator=seeded(1), output_type="tokens")
    canvas = torch.full((1, 3, 8, 8), 0.5)  # the pipeline's canvas is mid-grey outside the image
    canvas[:, :, 2:6, 2:6] = small
    repaint = torch.ones(1, 8, 8, dtype=torch.bool)
    repaint[:, 2:6, 2:6] = False
    km = out.known_mask
    assert torch.equal(km, known_token_mask(repaint, tok.spec)) and km.any()
    assert torch.equal(out.tokens.data[km], encoded(tok, canvas)[km])
    full = pipe(images(1), keep_box=(0, 0, 8, 4), class_labels=4, generator=seeded(1), output_type="tokens")
    assert torch.equal(full.known_mask, known_token_mask(load_masks(half_mask()), tok.spec))


def test_variation_resamples_the_requested_fraction(parts):
    tok, gen, _ = parts
    pipe = quiet(ImageVariationPipeline(tok, gen))
    x = images(1)
    out = pipe(x, strength=0.25, class_labels=1, num_images_per_prompt=3, generator=seeded(0, 1, 2),
               output_type="tokens")
    length = tok.spec.length
    assert ((~out.known_mask).sum(1) == round(0.25 * length)).all()
    known = encoded(tok, x).expand(3, -1, -1)
    assert torch.equal(out.tokens.data[out.known_mask], known[out.known_mask])
    assert not torch.equal(out.known_mask[0], out.known_mask[1])  # each image draws its own positions
    same = pipe(x, strength=0.0, class_labels=1, generator=seeded(0), output_type="tokens")
    assert torch.equal(same.tokens.data, known[:1])


# ---------------------------------------------------------------- unconditional and reconstruction
def test_unconditional_generation():
    tok = tiny_vq()
    pipe = quiet(UnconditionalImagePipeline(tok, tiny_generator("random_order", tok.spec, "none")))
    out = pipe(batch_size=3, generator=seeded(0, 1, 2), output_type="pt")
    assert out.images.shape == (3, 3, 8, 8)
    alone = pipe(batch_size=1, generator=seeded(1), output_type="tokens").tokens.data
    assert torch.equal(alone[0], out.tokens.data[1])
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=0)
    with pytest.raises(ValueError, match="class-to-image"):
        UnconditionalImagePipeline(tok, tiny_generator("random_order", tok.spec, "class"))


def test_reconstruction_returns_tokens_and_decoded_images():
    tok = tiny_vq()
    pipe = quiet(ImageReconstructionPipeline(tok))
    x = images(2)
    out = pipe(x, output_type="pt")
    codes = encoded(tok, x)
    assert torch.equal(out.tokens.data, codes)
    with torch.no_grad():
        expected = ((tok.decode(tok.encode(x * 2 - 1)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out.images, expected)
    assert pipe(x, output_type="tokens").images is None
    with pytest.raises(ValueError, match="8x8"):
        pipe(torch.rand(1, 3, 16, 16))


# ---------------------------------------------------------------- bad input
def test_a_generator_that_cannot_edit_is_refused_naming_it_and_its_tasks():
    tok = tiny_vq()
    raster = tiny_generator("raster", tok.spec)
    with pytest.raises(ValueError, match=r"RasterAR cannot do 'image-inpainting'.*class-to-image.*RandomOrderAR"):
        InpaintingPipeline(tok, raster)


def test_mask_of_the_wrong_size():
    tok, gen, _ = components("random_order")
    pipe = quiet(InpaintingPipeline(tok, gen))
    with pytest.raises(ValueError, match="mask_image must be 8x8.*got 4x4"):
        pipe(images(1), torch.zeros(4, 4), class_labels=0)


def test_batch_sizes_that_do_not_match():
    tok, gen, _ = components("random_order")
    pipe = quiet(InpaintingPipeline(tok, gen))
    with pytest.raises(ValueError, match="class_labels must hold 1 or 3"):
        pipe(images(3), half_mask(), class_labels=[0, 1])


def test_bad_editing_arguments():
    tok, gen, _ = components("random_order")
    var = quiet(ImageVariationPipeline(tok, gen))
    with pytest.raises(ValueError, match="strength"):
        var(images(1), strength=1.5, class_labels=0)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        var(images(1), class_labels=0, num_images_per_prompt=-1)
    with pytest.raises(ValueError, match=f"class_labels must lie in \\[0, {NUM_CLASSES - 1}\\]"):
        var(images(1), class_labels=NUM_CLASSES)
    out = quiet(OutpaintingPipeline(tok, gen))
    with pytest.raises(ValueError, match="offset"):
        out(images(1)[:, :, :4, :4], offset=(6, 0), class_labels=0)
    with pytest.raises(ValueError, match="keep_box"):
        out(images(1), class_labels=0)
