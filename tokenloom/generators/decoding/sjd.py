"""Speculative Jacobi Decoding (SJD; Teng et al. 2024): training-free, exact in distribution.

Each iteration feeds the last committed token and ``W - 1`` draft tokens in one forward pass, which gives the target
distributions ``p_t`` of the ``W`` positions after the committed prefix. The drafts are accepted left to right with
probability ``min(1, p_t(x) / q(x))`` (:func:`tokenloom.kernels.speculative_accept`), where ``q`` is the
distribution the draft was drawn from — for a Jacobi iterate, the previous iteration's ``p_{t-1}`` at that position
(SJD's probabilistic criterion). The first rejected position is redrawn from the residual
``normalise(max(p_t − q, 0))``; when every draft is accepted the last position is drawn from ``p_t`` (a bonus token).
The positions after that get new drafts drawn from this pass's ``p_t`` (the Jacobi update) and new positions entering
the window are initialised:

* ``init="random"``: uniform over the vocabulary (``q`` uniform);
* ``init="spatial"``: the token of the grid cell above, else the cell to the left, when that cell is already
  committed or drafted (``q`` one-hot: the draft is deterministic given the state), else uniform.

Exactness: at the first position not yet committed, ``p_t`` is the true conditional (its context is committed), and
the draft was drawn from ``q`` independently of the acceptance uniform, so accept-or-residual yields exactly
``p_t`` (speculative sampling; Leviathan et al. 2023). A one-hot ``q`` is exact for any draft value. So the samples
follow the model's joint distribution, whatever ``W`` and ``init``: ``W = 1`` is plain one-token-per-step
decoding. ``tests/test_decoding_exact.py`` checks this with chi-square tests on enumerable models.

Batches: rows accept different numbers of tokens. The window starts at the smallest committed length over the rows;
positions a row has already committed are fed again and count as accepted (one-hot ``p`` and ``q``), so every row is
exact and the batch takes as many passes as its slowest row (``last_stats`` reports them).

Relaxed acceptance (:mod:`.lantern`, :mod:`.grouped`) overrides :meth:`SJD.relax`: the drafts are then checked
against a modified target ``p*`` with ``TV(p*, p_t) <= delta`` per position.

Written here because the reference code (SJD's and GSD's Lumina-mGPT schedulers) is tied to transformers'
``generate`` loop, a batch of one and ``torch.multinomial``; this version is batched over rows with different
acceptance counts, uses the kernels' acceptance step and per-row generators, and runs on any target.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.generators.decoding.adapters import RandomOrderTarget, RasterTarget
from tokenloom.generators.decoding.base import Decoding, check_rows, position_probs, validate_int
from tokenloom.kernels import row_uniforms, speculative_accept
from tokenloom.kernels.torch_sampling import draw_dense

INITS = ("random", "spatial")


def draw_rows(probs: Tensor, generator) -> Tensor:
    """One draw per ``probs: [B, T, V]`` row and position → ``[B, T]``; row ``b`` uses ``generator[b]`` if a list."""
    b, t, v = probs.shape
    u = row_uniforms(generator, b, probs.device, per_row=t)
    return draw_dense(probs.reshape(b * t, v), u.reshape(-1)).view(b, t)


class SJD(Decoding):
    """Speculative Jacobi Decoding.

    Args:
        window: ``W >= 1`` tokens fed per forward pass (the last committed token + ``W - 1`` drafts).
        init: ``"random"`` or ``"spatial"`` initialisation of positions entering the window.
    """

    supports = ("raster_ar", "random_order_ar")

    def __init__(self, window: int = 8, init: str = "random"):
        super().__init__()
        self.window = validate_int("window", window)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window={self.window}, init={self.init!r})"

    # ------------------------------------------------------------------ hooks
    def prepare(self, model) -> None:
        """Called once per ``generate`` with the model (relaxed variants check their inputs against it)."""

    def relax(self, p: Tensor, q: Tensor, drafts: Tensor) -> Tensor:
        """The distribution the drafts are checked against: ``p`` itself (exact). ``p, q: [B, T, V]``."""
        return p

    # ------------------------------------------------------------------ entry points
    def generate(self, model, cond, params, generator, order=None, **options):
        if options:
            raise ValueError(f"{type(self).__name__} takes no options {sorted(options)}")
        self.prepare(model)
        cond = model.as_condition(cond)
        check_rows(params, generator, cond.batch_size)
        if type(model).registry_name == "raster_ar":
            if order is not None:
                raise ValueError(f"order applies to random-order generators, got order={order!r} for RasterAR")
            target = RasterTarget(model, cond, params)
        else:
            target = RandomOrderTarget(model, cond, params, generator, order)
        return target.finish(self.run(target, generator))

    def run(self, target, generator) -> Tensor:
        """Decode every position of ``target`` → tokens ``[B, L]`` in the target's order."""
        b, length, v, dev = target.batch_size, target.length, target.vocab_size, target.device
        w, params = self.window, target.params
        rows = torch.arange(b, device=dev)
        tokens = torch.zeros(b, length, dtype=torch.long, device=dev)
        logits, uncond = target.begin()
        tokens[:, 0] = draw_rows(position_probs(logits, uncond, [0], params, length), generator)[:, 0]
        committed = torch.ones(b, dtype=torch.long, device=dev)  # per row: positions < committed are final
        c, drafted = 1, 1  # c: smallest committed length; positions < drafted hold a token in every row
        q_win = torch.zeros(b, w, v, device=dev)  # draft distributions of positions c .. c + W - 1
        iterations = 0
        while c < length:
            t = min(w, length - c)
            if drafted < c + t - 1:
                self._initialise(target, tokens, q_win, c, drafted, c + t - 1, generator)
                drafted = c + t - 1
            logits, uncond = target.feed(tokens[:, c - 1:c + t - 1], c - 1)
            probs = position_probs(logits, uncond, range(c, c + t), params, length)  # [B, T, V]
            iterations += 1
            if t > 1:
                drafts = tokens[:, c:c + t - 1]
                done = torch.arange(c, c + t - 1, device=dev)[None] < committed[:, None]  # [B, T-1]
                onehot = torch.nn.functional.one_hot(drafts, v).to(probs.dtype)
                q = torch.where(done[..., None], onehot, q_win[:, :t - 1])
                p_check = torch.where(done[..., None], onehot, self.relax(probs[:, :t - 1], q, drafts))
                n_acc, nxt = speculative_accept(drafts, torch.cat([p_check, probs[:, t - 1:]], 1), generator,
                                                draft_probs=q)
            else:
                n_acc = torch.zeros(b, dtype=torch.long, device=dev)
                nxt = draw_rows(probs, generator)[:, 0]
            at = c + n_acc
            write = at >= committed
            tokens[rows[write], at[write]] = nxt[write]
            committed = torch.maximum(committed, at + 1)
            # Jacobi update: positions after the new token get drafts from this pass's distributions.
            fresh = draw_rows(probs, generator)  # [B, T]
            update = torch.arange(c, c + t, device=dev)[None] >= committed[:, None]
            tokens[:, c:c + t] = torch.where(update, fresh, tokens[:, c:c + t])
            q_win[:, :t] = torch.where(update[..., None], probs, q_win[:, :t])
            drafted = max(drafted, c + t)
            c_new = int(committed.min())
            target.truncate(c_new - 1)
            shift = c_new - c
            q_win = torch.cat([q_win[:, shift:], torch.zeros(b, min(shift, w), v, device=dev)], 1)[:, :w]
            c = c_new
        self.last_stats = {"forward_passes": target.passes, "iterations": iterations, "tokens": length,
                           "rows": b}
        return tokens

    def _initialise(self, target, tokens: Tensor, q_win: Tensor, c: int, start: int, end: int, generator) -> None:
        """Fill draft positions ``start..end-1`` (and their ``q`` in ``q_win``, window base ``c``) by ``self.init``."""
        b, v, dev = tokens.shape[0], target.vocab_size, tokens.device
        u = row_uniforms(generator, b, dev, per_row=end - start)
        rnd = (u * v).long().clamp(max=v - 1)  # [B, n] uniform tokens
        uniform = torch.full((v,), 1.0 / v, device=dev)
        rows = torch.arange(b, device=dev)
        grid = target.grid
        if self.init == "spatial":
            cells = target.cells  # [B, L]
            pos_of_cell = torch.empty_like(cells).scatter_(1, cells, torch.arange(cells.shape[1], device=dev)
                                                           .expand_as(cells).contiguous())
        for i, j in enumerate(range(start, end)):
            token, q = rnd[:, i], uniform.expand(b, v)
            if self.init == "spatial":
                cell = cells[:, j]
                width = grid.w if grid is not None else 1
                found = torch.zeros(b, dtype=torch.bool, device=dev)
                pick = token.clone()
                for nb, ok in (((cell - width), (cell >= width) if grid is not None else cell < 0),
                               ((cell - 1), (cell % width > 0) if grid is not None else cell > 0)):
                    nb_pos = pos_of_cell[rows, nb.clamp(min=0)]
                    use = ok & (nb_pos < j) & ~found
                    pick = torch.where(use, tokens[rows, nb_pos], pick)
                    found |= use
                token = pick
                q = torch.where(found[:, None], torch.nn.functional.one_hot(pick, v).float(), q)
            tokens[:, j] = token
            q_win[:, j - c] = q
