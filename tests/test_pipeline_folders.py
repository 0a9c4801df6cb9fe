"""Task folders: both loading routes, identical outputs after save → load, and the model card (README.md)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from pipeline_tiny import components, half_mask, images, seeded, tiny_generator, tiny_vq

import tokenloom
from tokenloom.pipelines.inpainting import InpaintingPipeline, OutpaintingPipeline
from tokenloom.pipelines.model_card import check_card
from tokenloom.pipelines.reconstruction import ImageReconstructionPipeline
from tokenloom.pipelines.unconditional import UnconditionalImagePipeline
from tokenloom.pipelines.variation import ImageVariationPipeline


def build(task: str, family: str = "random_order"):
    """A pipeline of ``task`` and the call that samples it with a fixed seed."""
    if task == "unconditional-image-generation":
        tok = tiny_vq()
        pipe = UnconditionalImagePipeline(tok, tiny_generator(family, tok.spec, "none"))
        return pipe, lambda p: p(batch_size=2, generator=seeded(0, 1), output_type="pt")
    if task == "image-reconstruction":
        return ImageReconstructionPipeline(tiny_vq()), lambda p: p(images(2), output_type="pt")
    tok, gen, _ = components(family)
    if task == "image-inpainting":
        return InpaintingPipeline(tok, gen), \
            lambda p: p(images(2), half_mask(), class_labels=[1, 2], generator=seeded(0, 1), output_type="pt")
    if task == "image-outpainting":
        return OutpaintingPipeline(tok, gen), \
            lambda p: p(images(1)[:, :, :4, :6], class_labels=3, generator=seeded(0), output_type="pt")
    return ImageVariationPipeline(tok, gen), \
        lambda p: p(images(1), strength=0.5, class_labels=0, generator=seeded(0), output_type="pt")


TASKS = ("unconditional-image-generation", "image-reconstruction", "image-inpainting", "image-outpainting",
         "image-variation")


@pytest.mark.parametrize("task,family", [(t, "random_order") for t in TASKS]
                         + [("image-inpainting", "masked"), ("image-inpainting", "next_scale")])
def test_task_folder_loads_through_both_routes_with_identical_output(task, family, tmp_path):
    import tokenloom.components  # noqa: F401  (diffusers loads only imported component libraries)

    pipe, call = build(task, family)
    pipe.set_progress_bar_config(disable=True)
    ref = call(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = tokenloom.pipeline(task, model=str(tmp_path))
    generic = DiffusionPipeline.from_pretrained(str(tmp_path), trust_remote_code=True)
    for other in (loaded, generic, tokenloom.load(str(tmp_path))):
        assert type(other) is type(pipe)
        other.set_progress_bar_config(disable=True)
        out = call(other)
        assert torch.equal(out.images, ref.images) and torch.equal(out.tokens.data, ref.tokens.data)


def test_a_folder_for_another_task_is_refused(tmp_path):
    pipe, _ = build("image-inpainting")
    pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="InpaintingPipeline, not a ImageVariationPipeline"):
        tokenloom.pipeline("image-variation", model=str(tmp_path))


def test_editing_pipeline_from_another_pipelines_components(tmp_path):
    """``from_pipe`` reuses a generation folder's components for zero-shot editing (what the CLI does)."""
    from tokenloom.pipelines.class_to_image import ClassToImagePipeline

    tok, gen, _ = components("random_order")
    c2i = ClassToImagePipeline(tok, gen, sampling_defaults={"top_k": 4})
    inpaint = InpaintingPipeline.from_pipe(c2i)
    assert type(inpaint) is InpaintingPipeline and inpaint.token_generator is gen
    assert inpaint.sampling_params().top_k == 4


# ---------------------------------------------------------------- model card
def test_saving_writes_a_model_card_with_unknown_for_missing_fields(tmp_path):
    pipe, _ = build("image-inpainting")
    pipe.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: tokenloom\nlicense: unknown\npipeline_tag: image-to-image\n")
    for section in ("## Recipe\n\nunknown", "## Data\n\nunknown", "## Metrics\n\nunknown", "## Licence\n\nunknown"):
        assert section in card
    assert "`RandomOrderAR`" in card and "`VQTokenizer`" in card and 'tokenloom.pipeline("image-inpainting"' in card


def test_card_fields_from_the_pipeline_and_from_save_pretrained_persist(tmp_path):
    tok, gen, _ = components("random_order")
    pipe = InpaintingPipeline(tok, gen, card={"recipe": "configs/generator/shapes_randar.yaml",
                                              "data": ["shapes (built-in)", "64x64"]})
    pipe.save_pretrained(tmp_path / "a", card={"metrics": {"fid": 12.5, "judge_accuracy": 0.81},
                                               "license": "apache-2.0"})
    card = (tmp_path / "a" / "README.md").read_text()
    assert "license: apache-2.0" in card and "configs/generator/shapes_randar.yaml" in card
    assert "- shapes (built-in)" in card and "| fid | 12.5 |" in card and "| judge_accuracy | 0.81 |" in card
    index = json.loads((tmp_path / "a" / "model_index.json").read_text())
    assert index["card"]["licence"] == "apache-2.0"
    again = tokenloom.pipeline("image-inpainting", model=str(tmp_path / "a"))
    again.save_pretrained(tmp_path / "b")  # the card travels with the folder
    assert (tmp_path / "b" / "README.md").read_text() == card.replace("# a —", "# b —")  # the title is the folder


def test_bad_card_fields_are_named():
    with pytest.raises(ValueError, match="unknown field 'licnese'"):
        check_card({"licnese": "mit"})
    with pytest.raises(TypeError, match="card must be a dict"):
        check_card("mit")
    with pytest.raises(TypeError, match=r"card\['metrics'\] must be JSON"):
        check_card({"metrics": {"fid": object()}})
