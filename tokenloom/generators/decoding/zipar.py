"""ZipAR-style next-set decoding for raster grids (He et al. 2024): rows decoded in parallel behind a window.

Row ``r + 1`` starts once row ``r`` has ``W`` decoded tokens; from then on every active row decodes its next token in
the same forward pass, so an ``h × w`` grid takes about ``w + (h − 1)·W`` passes instead of ``h·w``. Precisely, cell
``(r, c)`` is decoded in the first pass after row ``r − 1`` holds ``min(c + W, w)`` tokens.

Sense of exactness: each token is drawn (through :func:`tokenloom.kernels.sample`, with the params of its raster
step) from the model's conditional given the tokens decoded before it in raster order at that moment — at least the
same-row cells to its left and the previous rows' first ``min(c + W, w)`` cells. For a model whose conditionals only
depend on that context, ZipAR samples the same joint distribution as raster decoding
(``tests/test_decoding_exact.py``); with ``W >= w`` it *is* raster decoding (same tokens for the same seed). For a
raster-trained model it is an approximation, as in the paper: the missing upper-right context is simply absent, and
the first cell of a row is predicted from an auxiliary input (see :class:`~.adapters.RasterGridTarget`).
"""

from __future__ import annotations

import torch

from tokenloom import kernels
from tokenloom.generators.decoding.adapters import RasterGridTarget
from tokenloom.generators.decoding.base import Decoding, check_rows, validate_int


class ZipAR(Decoding):
    """Next-set decoding of raster grids.

    Args:
        window: ``W >= 1``: decoded tokens row ``r`` needs before row ``r + 1`` starts.
    """

    supports = ("raster_ar",)

    def __init__(self, window: int = 4):
        super().__init__()
        self.window = validate_int("window", window)

    def __repr__(self) -> str:
        return f"ZipAR(window={self.window})"

    def generate(self, model, cond, params, generator, **options):
        if options:
            raise ValueError(f"ZipAR takes no options {sorted(options)}")
        cond = model.as_condition(cond)
        check_rows(params, generator, cond.batch_size)
        target = RasterGridTarget(model, cond, params)
        return target.finish(self.run(target, generator))

    def schedule_step(self, counts: list[int], w: int) -> list[int]:
        """Rows that decode in the next pass, given tokens decoded per row so far."""
        rows = []
        for r, n in enumerate(counts):
            if n < w and (r == 0 or counts[r - 1] >= min(n + self.window, w)):
                rows.append(r)
        return rows

    def run(self, target, generator) -> torch.Tensor:
        """Decode every cell of ``target`` (a ``GridTarget``) → codes ``[B, L]`` in raster order."""
        b, length, dev = target.batch_size, target.length, target.device
        h, w = target.grid.h, target.grid.w
        params = target.params
        codes = torch.zeros(b, length, dtype=torch.long, device=dev)
        decoded = torch.zeros(length, dtype=torch.bool)
        counts = [0] * h
        logits, uncond = target.begin()
        targets = [0]
        while True:
            for j, cell in enumerate(targets):
                p = params.at_step(cell, length)
                u = uncond[:, j] if uncond is not None and p.guidance_scale != 1.0 else None
                codes[:, cell] = kernels.sample(logits[:, j], p, generator, uncond_logits=u)
                decoded[cell] = True
                counts[cell // w] += 1
            if sum(counts) == length:
                break
            targets = [r * w + counts[r] for r in self.schedule_step(counts, w)]
            logits, uncond = target.predict(targets, codes, decoded)
        self.last_stats = {"forward_passes": target.passes, "tokens": length, "rows": b}
        return codes

