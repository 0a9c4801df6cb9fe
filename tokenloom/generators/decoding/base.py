"""The decoding contract: what ``generate(..., decoding=...)`` hands a decoder, and what a decoder needs of a model.

A :class:`Decoding` object is a decoding algorithm with its settings (``SJD(window=8)``, ``ZipAR(window=4)``...).
Generators that accept one call :func:`run_decoding`, which checks the object, puts the model in eval mode and calls
``decoding.generate(model, cond, params, generator, **options) -> Tokens``. After a run, ``decoding.last_stats``
holds ``{"forward_passes": ..., "tokens": ...}`` (a forward pass = one backbone call on the whole batch, the
prefill included), which ``benchmarks/decoding.py`` reports.

Decoders do not talk to generator classes directly but to a *target* (``adapters.py``), so that the same algorithm
runs on a real generator and on the enumerable toy models of the tests:

* :class:`OrderedTarget` (speculative decoders: SJD, LANTERN, grouped): an AR model over ``L`` positions in a fixed
  per-row order with a rollback-able state. ``begin()`` gives the logits of position 0; ``feed(tokens, start)``
  appends the inputs at positions ``start..start+T-1`` and returns the logits of positions ``start+1..start+T``;
  ``truncate(n)`` forgets the inputs at positions ``>= n``.
* :class:`GridTarget` (ZipAR): ``predict(targets, codes, decoded)`` gives the logits of the raster cells ``targets``
  given every decoded cell before each of them in raster order.

Logits come back as ``(cond [B, T, V], uncond [B, T, V] | None)``; the decoders apply the sampling params of each
position (``params.at_step(position, L)``, as one-token-per-step decoding does) through :mod:`tokenloom.kernels`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.kernels import filtered_probs
from tokenloom.kernels.checks import PER_ROW_FIELDS, check_finite, check_generator
from tokenloom.tokens import Grid, Tokens


class OrderedTarget(Protocol):
    """An AR model over ``length`` positions in a fixed order per row (see the module docstring)."""

    batch_size: int
    length: int
    vocab_size: int
    device: torch.device
    params: SamplingParams
    passes: int  # forward passes so far (begin and every feed count one)
    grid: Grid | None  # the layout's grid (None for 1D layouts)
    cells: Tensor  # [B, L] long: the layout cell of each order position

    def begin(self) -> tuple[Tensor, Tensor | None]: ...

    def feed(self, tokens: Tensor, start: int) -> tuple[Tensor, Tensor | None]: ...

    def truncate(self, n: int) -> None: ...

    def finish(self, tokens: Tensor) -> Tokens: ...


class GridTarget(Protocol):
    """A raster-causal model over a ``Grid`` that can predict several cells per pass (ZipAR)."""

    batch_size: int
    length: int
    vocab_size: int
    device: torch.device
    params: SamplingParams
    passes: int
    grid: Grid

    def begin(self) -> tuple[Tensor, Tensor | None]: ...

    def predict(self, targets: list[int], codes: Tensor, decoded: Tensor) -> tuple[Tensor, Tensor | None]: ...

    def finish(self, codes: Tensor) -> Tokens: ...


class Decoding:
    """Base of every decoding algorithm; subclasses implement :meth:`generate`."""

    #: registry names of the generators this algorithm runs on
    supports: tuple[str, ...] = ()

    def __init__(self):
        self.last_stats: dict = {}

    def generate(self, model, cond, params: SamplingParams, generator, **options) -> Tokens:
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Raise a ``ValueError`` unless ``model`` is a generator this algorithm can drive."""
        name = getattr(type(model), "registry_name", type(model).__name__)
        if name not in self.supports:
            raise ValueError(f"decoding={self!r} runs on generators {self.supports}, got a {type(model).__name__} "
                             f"({name!r})")
        spec = model.spec
        if spec.kind != "index" or spec.depth != 1:
            raise ValueError(f"decoding={self!r} needs 'index' tokens of depth 1 (a categorical head), got "
                             f"kind={spec.kind!r}, depth={spec.depth}")
        if not hasattr(model.output_head, "logits") or not hasattr(model.output_head, "sample_logits"):
            raise ValueError(f"decoding={self!r} needs a head with logits (categorical), got "
                             f"{type(model.output_head).__name__}")


def run_decoding(decoding, model, cond, params, generator, **options) -> Tokens:
    """What ``generate(..., decoding=...)`` calls: check, eval mode, run, restore the mode."""
    if not isinstance(decoding, Decoding):
        raise TypeError(f"decoding must be None or a tokenloom.generators.decoding.Decoding (SJD, LANTERN, "
                        f"GroupedSD, ZipAR), got {type(decoding).__name__}: {decoding!r}")
    decoding.check_model(model)
    params = SamplingParams() if params is None else params
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return decoding.generate(model, cond, params, generator, **options)
    finally:
        model.train(was_training)


def check_rows(params: SamplingParams, generator, rows: int) -> None:
    """Per-row params and generator lists must have ``rows`` entries."""
    check_generator(generator, rows)
    for name in PER_ROW_FIELDS:
        value = getattr(params, name)
        if isinstance(value, Tensor) and value.shape != (rows,):
            raise ValueError(f"SamplingParams.{name} has {value.numel()} per-row values but cond has {rows} rows")


def position_probs(logits: Tensor, uncond: Tensor | None, positions, params: SamplingParams, length: int) -> Tensor:
    """Target distributions ``[B, T, V]`` of ``logits: [B, T, V]`` at order ``positions`` (T ints).

    Position ``t`` uses ``params.at_step(t, length)`` (guidance schedule, temperature, min-p, top-k, top-p), exactly
    what one-token-per-step decoding samples from.
    """
    check_finite("logits", logits)
    steps = [params.at_step(int(pos), length) for pos in positions]
    b, t, v = logits.shape
    if len({p.guidance_scale for p in steps}) == 1:  # one call over the B·T rows (row-major: b, then position)
        p = steps[0]
        per_row = {name: getattr(p, name).repeat_interleave(t) for name in PER_ROW_FIELDS
                   if isinstance(getattr(p, name), Tensor)}
        u = uncond.reshape(b * t, v) if uncond is not None and p.guidance_scale != 1.0 else None
        return filtered_probs(logits.reshape(b * t, v), p.replace(**per_row), u).view(b, t, v)
    out = []
    for j, p in enumerate(steps):
        u = uncond[:, j] if uncond is not None and p.guidance_scale != 1.0 else None
        out.append(filtered_probs(logits[:, j], p, u))
    return torch.stack(out, dim=1)


def validate_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def validate_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)
