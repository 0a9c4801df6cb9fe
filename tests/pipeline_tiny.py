"""Tiny untrained components for the pipeline tests (tests/test_pipeline_*.py): one builder per generator family.

Weights are randomised (as tests/test_random_order.py does) so that samples vary; every model is small enough for a
whole task call to take well under a second on a CPU.
"""

from __future__ import annotations

import torch

from tokenloom import generators
from tokenloom.tokenizers.multiscale import MultiScaleVQTokenizer
from tokenloom.tokenizers.vq import VQTokenizer

CAPTIONS = ["a red circle", "two blue squares", "a green triangle above a white circle"]
NUM_CLASSES = 5


def randomize(model, seed: int = 0, scale: float = 1.0):
    """Visible random weights (the default init zeroes output layers); ``scale`` multiplies the matrices."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.dim() == 2 and "embedding" not in name and "null" not in name:
                p.copy_(scale * noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise)
    return model.eval()


def tiny_vq() -> VQTokenizer:
    """8x8 images → a 4x4 grid of 16 codes (2x2-pixel patches)."""
    torch.manual_seed(0)
    return VQTokenizer(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                       codebook_size=16, codebook_dim=4).eval()


def tiny_msvq() -> MultiScaleVQTokenizer:
    """8x8 images → scales 1, 2, 3, 4 (30 tokens)."""
    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(image_size=8, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4,
                                codebook_size=16, codebook_dim=4, scales=[1, 2, 3, 4]).eval()
    with torch.no_grad():
        tok.quantize.quantizer.vq.embedding.weight.normal_()
    return tok


def condition_args(condition: str) -> dict:
    return {"class": {"num_classes": NUM_CLASSES}, "text": {"cond_dim": 32, "cond_len": 12}, "none": {}}[condition]


def tiny_generator(family: str, spec, condition: str = "class"):
    """``family``: ``random_order``, ``masked``, ``next_scale`` or ``raster`` (cannot edit)."""
    extra = condition_args(condition)
    if family == "random_order":
        model = generators.build("random_order_ar", token_spec=spec.to_dict(), width=32, depth=2, num_heads=4,
                                 multiple_of=16, condition=condition, **extra)
    elif family == "masked":
        model = generators.build("masked_ar", token_spec=spec.to_dict(), encoder_width=32, encoder_depth=1,
                                 encoder_num_heads=2, decoder_width=32, decoder_depth=1, decoder_num_heads=2,
                                 buffer_size=12, condition=condition, attn_dropout=0.0, proj_dropout=0.0,
                                 head="categorical", num_steps=4, **extra)
    elif family == "next_scale":
        model = generators.build("next_scale", token_spec=spec.to_dict(), input_dim=4, width=32, depth=2,
                                 num_heads=2, condition=condition, **extra)
    elif family == "raster":
        model = generators.build("raster_ar", token_spec=spec.to_dict(), width=32, depth=2, num_heads=2,
                                 multiple_of=16, condition=condition, **extra)
    else:
        raise ValueError(family)
    return randomize(model)


def tiny_text_conditioner():
    from tokenloom.conditioning.openclip_text import OpenCLIPTextConditioner

    torch.manual_seed(2)
    return OpenCLIPTextConditioner.for_captions(CAPTIONS, width=32, heads=2, layers=1, context_length=12).eval()


def components(family: str, condition: str = "class") -> tuple:
    """``(image_tokenizer, token_generator, conditioner)`` for ``family``."""
    tok = tiny_msvq() if family == "next_scale" else tiny_vq()
    conditioner = tiny_text_conditioner() if condition == "text" else None
    return tok, tiny_generator(family, tok.spec, condition), conditioner


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    """``[n, 3, 8, 8]`` in [0, 1] (the pipelines' tensor input range)."""
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def half_mask() -> torch.Tensor:
    """``[8, 8]``: repaint the right half."""
    mask = torch.zeros(8, 8)
    mask[:, 4:] = 1
    return mask
