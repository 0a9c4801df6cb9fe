"""Enumerable toy targets with a known joint distribution, for exactness tests of the decoders.

* :class:`ToyOrderedTarget`: an AR model over ``L`` positions with a fixed random table ``p(x_t | x_<t)`` for every
  prefix (``V**t`` rows at position ``t``); :meth:`ToyOrderedTarget.joint` enumerates all ``V**L`` sequences.
* :class:`ToyGridTarget`: a raster model over an ``h × w`` grid whose conditional at cell ``(r, c)`` depends only on
  ZipAR's guaranteed context for window ``W`` (same-row cells left of it, previous rows' first ``min(c + W, w)``
  cells); :meth:`ToyGridTarget.predict` *checks* that this context is decoded, so a schedule bug fails loudly.

Both return logits (log-probabilities), so the decoders' sampling params apply as they do on real models.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from tokenloom.config import SamplingParams
from tokenloom.tokens import Grid


def _tables(sizes: list[int], v: int, seed: int, sharpness: float) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(torch.randn(n, v, generator=g, dtype=torch.float64) * sharpness, -1) for n in sizes]


class ToyOrderedTarget:
    """``L`` positions, vocabulary ``V``; position ``t``'s logits depend on the whole prefix ``x_<t``.

    Args:
        batch_size, length, vocab_size: ``B``, ``L``, ``V`` (``V**L`` must stay enumerable).
        seed, sharpness: the random tables (``log_softmax(sharpness · N(0, 1))``).
        grid: optional layout grid (``h · w == L``) for spatial initialisation.
        params: sampling params applied by the decoders.
    """

    def __init__(self, batch_size: int, length: int, vocab_size: int, seed: int = 0, sharpness: float = 1.0,
                 grid: Grid | None = None, params: SamplingParams | None = None):
        self.batch_size, self.length, self.vocab_size = batch_size, length, vocab_size
        self.device = torch.device("cpu")
        self.params = SamplingParams() if params is None else params
        self.grid = grid
        self.cells = torch.arange(length).expand(batch_size, -1)
        self.tables = _tables([vocab_size**t for t in range(length)], vocab_size, seed, sharpness)
        self.fed = torch.zeros(batch_size, length, dtype=torch.long)
        self.fed_len = 0
        self.passes = 0

    def _logits(self, position: int) -> Tensor:
        code = torch.zeros(self.batch_size, dtype=torch.long)
        for t in range(position):
            code = code * self.vocab_size + self.fed[:, t]
        return self.tables[position][code].float()

    def begin(self):
        self.passes += 1
        return self._logits(0)[:, None], None

    def feed(self, tokens: Tensor, start: int):
        if start != self.fed_len:
            raise AssertionError(f"feed at {start} but {self.fed_len} inputs are held")
        t = tokens.shape[1]
        self.fed[:, start:start + t] = tokens
        self.fed_len = start + t
        self.passes += 1
        return torch.stack([self._logits(i) for i in range(start + 1, start + t + 1)], 1), None

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.fed_len:
            raise AssertionError(f"truncate to {n} with {self.fed_len} inputs held")
        self.fed_len = n

    def finish(self, tokens: Tensor) -> Tensor:
        return tokens

    def joint(self, transform=None) -> Tensor:
        """``[V**L]`` float64 probabilities of every sequence (base-V code, first token most significant).

        ``transform(logits [N, V]) -> probs [N, V]`` applies sampling params (default: softmax).
        """
        v = self.vocab_size
        probs = [(t.exp() if transform is None else transform(t.float()).double()) for t in self.tables]
        out = torch.empty(v**self.length, dtype=torch.float64)
        for seq in itertools.product(range(v), repeat=self.length):
            prob, code = 1.0, 0
            for t, tok in enumerate(seq):
                prob *= float(probs[t][code, tok])
                code = code * v + tok
            out[code] = prob
        return out


def sequence_codes(tokens: Tensor, vocab_size: int) -> Tensor:
    """``[N, L]`` tokens → ``[N]`` base-V codes (first token most significant)."""
    code = torch.zeros(tokens.shape[0], dtype=torch.long)
    for t in range(tokens.shape[1]):
        code = code * vocab_size + tokens[:, t].long().cpu()
    return code


class ToyGridTarget:
    """Raster model over ``grid`` whose cell ``(r, c)`` depends only on ZipAR's guaranteed context for ``window``."""

    def __init__(self, batch_size: int, grid: Grid, vocab_size: int, window: int, seed: int = 0,
                 sharpness: float = 1.0, params: SamplingParams | None = None):
        self.batch_size, self.grid, self.vocab_size = batch_size, grid, vocab_size
        self.length = grid.length
        self.device = torch.device("cpu")
        self.params = SamplingParams() if params is None else params
        w = grid.w
        self.context = []
        for p in range(self.length):
            r, c = divmod(p, w)
            self.context.append([q for q in range(p) if q // w == r or q % w < min(c + window, w)])
        self.tables = _tables([vocab_size ** len(k) for k in self.context], vocab_size, seed, sharpness)
        self.passes = 0

    def _logits(self, p: int, codes: Tensor, decoded: Tensor | None) -> Tensor:
        code = torch.zeros(codes.shape[0], dtype=torch.long)
        for q in self.context[p]:
            if decoded is not None and not bool(decoded[q]):
                raise AssertionError(f"cell {p} predicted before its context cell {q} was decoded")
            code = code * self.vocab_size + codes[:, q]
        return self.tables[p][code].float()

    def begin(self):
        self.passes += 1
        return self._logits(0, torch.zeros(self.batch_size, 0, dtype=torch.long), None)[:, None], None

    def predict(self, targets: list[int], codes: Tensor, decoded: Tensor):
        self.passes += 1
        return torch.stack([self._logits(p, codes, decoded) for p in targets], 1), None

    def finish(self, codes: Tensor) -> Tensor:
        return codes

    def joint(self) -> Tensor:
        """``[V**L]`` probabilities of every grid (raster base-V code)."""
        v = self.vocab_size
        out = torch.empty(v**self.length, dtype=torch.float64)
        for seq in itertools.product(range(v), repeat=self.length):
            x = torch.tensor(seq)[None]
            prob = 1.0
            for p in range(self.length):
                prob *= float(self._logits(p, x, None)[0, seq[p]].double().exp())
            out[int(sequence_codes(x, v))] = prob
        return out
