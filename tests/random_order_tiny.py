"""The tiny RandomOrderAR models and conditions shared by the ``test_random_order*.py`` files."""

from __future__ import annotations

import torch
from pipeline_tiny import randomize

from tokenloom import generators
from tokenloom.generators.condition import Condition
from tokenloom.generators.random_order import RandomOrderAR
from tokenloom.tokens import Grid, TokenSpec

SPEC = TokenSpec(kind="index", vocab_size=24, layout=Grid(3, 4))
CSPEC = TokenSpec(kind="continuous", dim=4, layout=Grid(3, 4))
L = SPEC.length
DIFFUSION = {"depth": 1, "mlp_width": 32, "num_sampling_steps": 8, "clip_denoised": 3.0}


def make(condition: str = "class", seed: int = 0, spec: TokenSpec = SPEC, **kw) -> RandomOrderAR:
    torch.manual_seed(seed)
    extra = {"class": {"num_classes": 5}, "text": {"cond_dim": 6, "cond_len": 3}, "none": {}}[condition]
    if spec.kind == "continuous":
        extra = {**extra, "head": "diffusion", "head_options": DIFFUSION}
    model = generators.build("random_order_ar", token_spec=spec.to_dict(), width=32, depth=2, num_heads=4,
                             multiple_of=16, condition=condition, **{**extra, **kw})
    return randomize(model, seed) if spec.kind == "index" else model.eval()


def cond_for(condition: str, b: int = 3, seed: int = 0) -> Condition:
    """A ``class`` / ``text`` (``[b, 3, 6]`` features with padding) / ``none`` condition for tiny generators."""
    g = torch.Generator().manual_seed(seed)
    if condition == "class":
        return Condition(labels=torch.randint(0, 5, (b,), generator=g))
    if condition == "text":
        mask = torch.ones(b, 3, dtype=torch.bool)
        mask[0, 2] = mask[-1, 0] = False  # padding, including a leading pad
        return Condition(features=torch.randn(b, 3, 6, generator=g), mask=mask)
    return Condition(batch=b)


def random_orders(b: int, seed: int = 0, length: int = L) -> torch.Tensor:
    return torch.rand(b, length, generator=torch.Generator().manual_seed(seed)).argsort(-1)


def count_passes(model) -> list[int]:
    """A list that grows by one per backbone pass (the final norm runs once per pass)."""
    calls: list[int] = []
    model.norm.register_forward_hook(lambda *args: calls.append(1))
    return calls
