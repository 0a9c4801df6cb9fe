"""Exponential moving average of a model's parameters, checkpointable through ``accelerator.save_state``.

``shadow ← d·shadow + (1 − d)·param`` after every optimiser step, with the warm-up ``d = min(decay,
(1 + n) / (10 + n))`` (``n`` = updates so far) that timm and diffusers use, so early shadows are not stuck near
the random initialisation. Buffers are not averaged (they are copied from the model at export).

Why not ``diffusers.training_utils.EMAModel``: its ``state_dict`` stores the shadow as a list aligned with
``parameters()`` and its warm-up options differ between versions; a keyed, float32 shadow with a fixed rule
is what bit-exact resumption needs.
"""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Float32 shadow copies of ``model``'s trainable parameters, keyed by name.

    Args:
        model: the (unwrapped) model whose parameters are averaged.
        decay: the asymptotic decay in ``(0, 1)``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (in its own dtype)."""
        params = dict(model.named_parameters())
        missing = sorted(set(self.shadow) - set(params))
        if missing:
            raise ValueError(f"EMA holds parameters the model lacks: {missing[:5]}")
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        if set(state["shadow"]) != set(self.shadow):
            diff = sorted(set(state["shadow"]) ^ set(self.shadow))
            raise ValueError(f"EMA checkpoint does not fit the model: differing parameter names {diff[:5]}")
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
