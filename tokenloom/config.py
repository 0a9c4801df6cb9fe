"""The one sampling vocabulary: :class:`SamplingParams` and :class:`GuidanceSchedule`.

Order of operations on logits (vLLM's): float32 → guidance (``uncond + s·(cond − uncond)``)
→ temperature → min-p → top-k → top-p → draw. ``guidance_scale`` has diffusers' meaning: 1.0 is
no guidance. Other "temperatures" keep other names (``noise_temperature`` for diffusion heads,
``remask_temperature`` for masked AR) and live on the generator or head that uses them.

Scalar fields may also be 1D tensors with one value per row (per-row sampling, see
:func:`tokenloom.kernels.sample`). This module imports nothing of the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor

SCHEDULES = ("constant", "linear", "power-cosine", "steps", "interval")


@dataclass(frozen=True)
class GuidanceSchedule:
    """How the guidance scale varies over a generation of ``num_steps`` steps.

    The schedule maps (step, num_steps, guidance_scale ``s``) to the scale used at that step.
    ``progress = step / (num_steps - 1)`` runs from 0 at the first step to 1 at the last.

    * ``constant``: ``s`` at every step.
    * ``linear``: ``start + (s - start) · progress``. VAR's ramp ``(1 + t)·cond − t·uncond`` with
      ``t = cfg · k/(K−1)`` is ``linear(start=1)`` with ``s = 1 + cfg``; MAR's is ``start=1`` over its own
      progress (the fraction of revealed tokens: see ``interop/mar.py``).
    * ``power-cosine``: ``start + (s - start) · (1 - cos(π · progress**power)) / 2`` (MDT/Muse).
    * ``steps``: the explicit per-step list ``values`` (``s`` is ignored).
    * ``interval``: ``s`` while ``low <= progress <= high``, else 1.0 (no guidance), e.g. LlamaGen's
      ``cfg_interval`` or guidance-interval sampling.
    """

    kind: Literal["constant", "linear", "power-cosine", "steps", "interval"] = "constant"
    start: float = 1.0
    power: float = 1.0
    values: tuple[float, ...] = ()
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"GuidanceSchedule.kind must be one of {SCHEDULES}, got {self.kind!r}")
        if self.power <= 0:
            raise ValueError(f"GuidanceSchedule.power must be > 0, got {self.power}")
        if self.kind == "steps" and not self.values:
            raise ValueError("GuidanceSchedule.values must be a non-empty list for kind='steps', got ()")
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if any(v < 0 or not math.isfinite(v) for v in self.values):
            raise ValueError(f"GuidanceSchedule.values must be finite and >= 0, got {self.values}")
        if not 0.0 <= self.low <= self.high <= 1.0:
            raise ValueError(
                f"GuidanceSchedule interval needs 0 <= low <= high <= 1, got low={self.low}, high={self.high}"
            )

    @classmethod
    def constant(cls) -> GuidanceSchedule:
        return cls("constant")

    @classmethod
    def linear(cls, start: float = 1.0) -> GuidanceSchedule:
        return cls("linear", start=start)

    @classmethod
    def power_cosine(cls, power: float = 1.0, start: float = 1.0) -> GuidanceSchedule:
        return cls("power-cosine", start=start, power=power)

    @classmethod
    def steps(cls, values) -> GuidanceSchedule:
        return cls("steps", values=tuple(values))

    @classmethod
    def interval(cls, low: float = 0.0, high: float = 1.0) -> GuidanceSchedule:
        return cls("interval", low=low, high=high)

    def scale(self, guidance_scale: float, step: int, num_steps: int) -> float:
        """The guidance scale at ``step`` (0-based) of ``num_steps``."""
        if num_steps < 1 or not 0 <= step < num_steps:
            raise ValueError(f"step must lie in [0, num_steps), got step={step}, num_steps={num_steps}")
        if self.kind == "steps":
            if len(self.values) != num_steps:
                raise ValueError(
                    f"GuidanceSchedule.values has {len(self.values)} entries but the generation takes "
                    f"{num_steps} steps"
                )
            return self.values[step]
        progress = step / (num_steps - 1) if num_steps > 1 else 1.0
        if self.kind == "constant":
            return guidance_scale
        if self.kind == "linear":
            return self.start + (guidance_scale - self.start) * progress
        if self.kind == "power-cosine":
            return self.start + (guidance_scale - self.start) * (1 - math.cos(math.pi * progress**self.power)) / 2
        return guidance_scale if self.low <= progress <= self.high else 1.0


def _check_field(name: str, value, low: float, high: float, low_open: bool = False, integer: bool = False):
    """Validate a scalar or per-row tensor field against ``[low, high]`` (``(low, high]`` if low_open)."""
    if isinstance(value, Tensor):
        if value.dim() != 1 or value.numel() == 0:
            raise ValueError(f"SamplingParams.{name} as a tensor must be 1D with one value per row, got "
                             f"shape {tuple(value.shape)}")
        if integer and value.is_floating_point():
            raise TypeError(f"SamplingParams.{name} must be an integer tensor, got {value.dtype}")
        vals = value.double()
        if not torch.isfinite(vals).all():
            raise ValueError(f"SamplingParams.{name} must be finite, got {value.tolist()}")
        lo_ok = (vals > low) if low_open else (vals >= low)
        if not (lo_ok & (vals <= high)).all():
            raise ValueError(f"SamplingParams.{name} values must lie in {'(' if low_open else '['}{low}, "
                             f"{high}], got {value.tolist()}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"SamplingParams.{name} must be a number or a 1D tensor, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise TypeError(f"SamplingParams.{name} must be an int, got {value!r}")
    ok = (value > low if low_open else value >= low) and value <= high and math.isfinite(value)
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"SamplingParams.{name} must lie in {bracket}{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by every generator, head and kernel.

    Args:
        temperature: logits are divided by it; 0 means greedy (argmax). ``>= 0``.
        top_k: keep the k most likely tokens; 0 = off. ``>= 0``.
        top_p: keep the smallest set whose probability reaches p; 1.0 = off. In ``(0, 1]``.
        min_p: drop tokens with probability below ``min_p · p_max``; 0 = off. In ``[0, 1]``.
        guidance_scale: classifier-free guidance ``uncond + s·(cond − uncond)``; 1.0 = off. ``>= 0``.
        guidance_schedule: how the scale varies over the steps of a generation.
        num_steps: steps for masked AR, diffusion/flow heads and block diffusion (None = the model's default).
    """

    temperature: float | Tensor = 1.0
    top_k: int | Tensor = 0
    top_p: float | Tensor = 1.0
    min_p: float | Tensor = 0.0
    guidance_scale: float = 1.0
    guidance_schedule: GuidanceSchedule = field(default_factory=GuidanceSchedule)
    num_steps: int | None = None

    def __post_init__(self):
        _check_field("temperature", self.temperature, 0.0, math.inf)
        _check_field("top_k", self.top_k, 0, math.inf, integer=True)
        _check_field("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_field("min_p", self.min_p, 0.0, 1.0)
        if isinstance(self.guidance_scale, Tensor):
            raise TypeError("SamplingParams.guidance_scale must be a number, got a tensor")
        _check_field("guidance_scale", self.guidance_scale, 0.0, math.inf)
        if not isinstance(self.guidance_schedule, GuidanceSchedule):
            raise TypeError(
                f"SamplingParams.guidance_schedule must be a GuidanceSchedule, got "
                f"{type(self.guidance_schedule).__name__}"
            )
        if self.num_steps is not None and (
            isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1
        ):
            raise ValueError(f"SamplingParams.num_steps must be None or a positive int, got {self.num_steps!r}")

    @property
    def uses_guidance(self) -> bool:
        """True when any step of a generation may apply classifier-free guidance."""
        if self.guidance_schedule.kind == "steps":
            return any(v != 1.0 for v in self.guidance_schedule.values)
        if self.guidance_schedule.kind in ("linear", "power-cosine") and self.guidance_schedule.start != 1.0:
            return True
        return self.guidance_scale != 1.0

    def at_step(self, step: int, num_steps: int) -> SamplingParams:
        """These params with ``guidance_scale`` replaced by the schedule's value at ``step``."""
        scale = self.guidance_schedule.scale(self.guidance_scale, step, num_steps)
        return replace(self, guidance_scale=scale, guidance_schedule=GuidanceSchedule())

    def replace(self, **changes) -> SamplingParams:
        return replace(self, **changes)
