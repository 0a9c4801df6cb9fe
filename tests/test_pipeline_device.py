"""Device and precision: bf16 weights and autocast on CPU, model CPU offload hooks, loading in another dtype."""

from __future__ import annotations

import pytest
import torch
from accelerate.hooks import CpuOffload
from pipeline_tiny import components, half_mask, images, seeded

import tokenloom
from tokenloom.pipelines.class_to_image import ClassToImagePipeline
from tokenloom.pipelines.inpainting import InpaintingPipeline

FAMILIES = ("random_order", "masked", "next_scale")


def inpaint(pipe):
    return pipe(images(2), half_mask(), class_labels=[1, 2], num_images_per_prompt=2, generator=seeded(0, 1, 2, 3),
                output_type="pt")


def assert_close_run(a, b):
    """bf16 changes logits slightly: most tokens equal, images close on average."""
    assert (a.tokens.data == b.tokens.data).float().mean() >= 0.9
    assert (a.images - b.images).abs().mean() < 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_on_cpu_runs_and_stays_close(family):
    tok, gen, _ = components(family)
    pipe = InpaintingPipeline(tok, gen)
    pipe.set_progress_bar_config(disable=True)
    ref = inpaint(pipe)
    pipe.enable_autocast(torch.bfloat16)
    low = inpaint(pipe)
    known = pipe.encode_images(images(2) * 2 - 1).data.repeat_interleave(2, 0)  # the encoder runs in bf16 too
    pipe.disable_autocast()
    assert_close_run(low, ref)
    assert torch.equal(low.tokens.data[low.known_mask], known[low.known_mask])  # known tokens stay exact
    assert torch.equal(inpaint(pipe).tokens.data, ref.tokens.data)  # off again: float32 as before


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_weights_with_to_dtype(family):
    tok, gen, _ = components(family)
    pipe = ClassToImagePipeline(tok, gen)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe([1, 2], generator=seeded(0, 1), output_type="pt")
    pipe.to(torch.bfloat16)
    assert pipe.token_generator.dtype == torch.bfloat16 and pipe.image_tokenizer.dtype == torch.bfloat16
    low = pipe([1, 2], generator=seeded(0, 1), output_type="pt")
    assert low.images.dtype == torch.float32  # outputs are float32 in [0, 1] whatever the weights
    assert_close_run(low, ref)


def test_loading_a_folder_in_bf16(tmp_path):
    tok, gen, _ = components("random_order")
    InpaintingPipeline(tok, gen).save_pretrained(tmp_path)
    pipe = tokenloom.pipeline("image-inpainting", model=str(tmp_path), torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.token_generator.dtype == torch.bfloat16
    out = inpaint(pipe)
    assert out.images.shape == (4, 3, 8, 8)


def test_autocast_dtype_must_be_supported():
    tok, gen, _ = components("random_order")
    pipe = InpaintingPipeline(tok, gen)
    with pytest.raises(ValueError, match="autocast dtype must be one of"):
        pipe.enable_autocast(torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_model_cpu_offload_without_an_accelerator_is_diffusers_clear_error():
    tok, gen, _ = components("random_order")
    with pytest.raises(RuntimeError, match="requires accelerator"):
        InpaintingPipeline(tok, gen).enable_model_cpu_offload()


@pytest.mark.parametrize("family", ["random_order", "next_scale"])
def test_model_cpu_offload_hooks_move_each_component_before_use(family, monkeypatch):
    """With ``device="cpu"`` the hooks run on a CPU machine: outputs are unchanged and every component is brought
    to the execution device (``pre_forward``) before the pipeline calls it, in the order the pipeline uses them."""
    tok, gen, _ = components(family)
    pipe = InpaintingPipeline(tok, gen)
    pipe.set_progress_bar_config(disable=True)
    ref = inpaint(pipe)
    calls = []
    original = CpuOffload.pre_forward

    def spy(self, module, *args, **kwargs):
        calls.append(type(module).__name__)
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(CpuOffload, "pre_forward", spy)
    pipe.enable_model_cpu_offload(device="cpu")
    out = inpaint(pipe)
    assert torch.equal(out.tokens.data, ref.tokens.data) and torch.equal(out.images, ref.images)
    if family == "next_scale":  # the tokenizer serves every scale: kept on the device, not offloaded
        assert calls == [type(gen).__name__]
        assert not hasattr(tok, "_hf_hook")
    else:
        assert calls == [type(tok).__name__, type(gen).__name__, type(tok).__name__]
    assert len(pipe._all_hooks) >= 1  # maybe_free_model_hooks re-armed the hooks for the next call
    assert torch.equal(inpaint(pipe).tokens.data, ref.tokens.data)
