"""Continuous speculative decoding (CSpD; Wang et al. 2024) for RasterAR over continuous tokens: draft + target model.

Each round, the draft model proposes ``gamma`` tokens one after another, ``x_j ~ p_d(· | prefix, x_<j)``; the target
scores all of them (and one position more) in a single forward pass; draft ``x_j`` is accepted with probability
``min(1, p_t(x_j) / p_d(x_j))``, left to right. At the first rejection the token is redrawn from the residual
``r ∝ max(0, p_t − p_d)`` by rejection sampling — draw ``y ~ p_t``, keep it with probability
``max(0, 1 − p_d(y) / p_t(y))`` — and the round ends; when all ``gamma`` drafts are accepted the target's extra
position gives a bonus token drawn from ``p_t``. The first token comes from the target's prefill.

What is exact: with heads that have a tractable density (``log_prob``; the ``"gaussian"`` head,
:class:`tokenloom.heads.gaussian.GaussianHead`), the samples follow the target model's joint distribution exactly,
for any draft and any ``gamma`` (speculative sampling, Leviathan et al. 2023, holds for densities: the accepted mass
is ``min(p_t, p_d)`` and the residual supplies ``p_t − min(p_t, p_d)``; the rejection step draws from the residual
exactly because ``max(0, p_t − p_d) <= p_t``, with acceptance rate ``TV(p_t, p_d)`` per try). Guidance and
temperature enter both densities through the heads' ``log_prob`` with the same params as their ``sample``.
``tests/test_decoding_continuous.py`` checks the output law (KS tests) and the acceptance rate ``1 − TV``.

What is not exact / not done:

* The residual draw is capped at ``max_residual_tries`` proposals per token; if a row exhausts it a ``RuntimeError``
  is raised (never a silent biased token). A row reaches the residual with probability ``TV`` and needs ``1/TV``
  tries on average, so the chance of the error is at most ``~1 / (e · max_residual_tries)`` per token.
* Diffusion and flow heads are **not supported** (clear error): their per-token density is not available in closed
  form. CSpD's answer — the joint density of the sampled denoising trajectory under both models, with shared noise
  (trajectory alignment) — is not implemented here.
* Float32 densities: ``p_t / p_d`` is computed as ``exp(log p_t − log p_d)``; rounding is the only departure.

Batches: rows accept different numbers of tokens. A round starts at the least advanced row; positions a row already
committed are fed again as forced drafts and count as accepted (they are final), so every row is exact; the batch
takes as many rounds as its slowest row. ``last_stats`` holds ``forward_passes`` (target backbone calls, prefill
included), ``draft_passes``, ``proposed`` / ``accepted`` (non-forced drafts) and ``acceptance_rate``.

Written here because CSpD targets MAR-style diffusion heads through their denoising trajectories; this is the plain
exact acceptance–rejection scheme for heads with a density, batched over rows with different acceptance counts, on
RasterAR's KV caches (``step`` with several tokens, ``KVCache.truncate``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.generators.decoding.base import Decoding, check_rows, validate_int
from tokenloom.kernels import row_uniforms
from tokenloom.tokens import Tokens


class _Runner:
    """One model (draft or target) with its KV cache; ``z`` rows ``[B']`` (``2B`` with the guidance rows)."""

    def __init__(self, model, cond, guided: bool):
        self.model, self.guided = model, guided
        self.b = cond.batch_size
        prefix = model.embed_prefix(cond, guided, drop=False)
        self.cache = model.new_cache(prefix.x.shape[0])
        self.z0 = model.prefill(prefix, self.cache)  # [B', C]: predicts position 0
        self.fed = 0  # token inputs in the cache (positions 0..fed-1)
        self.passes = 1

    def feed(self, values: Tensor) -> Tensor:
        """Append ``values: [B, T, D]`` at positions ``fed..fed+T-1`` → ``z [B', T, C]`` (predicting the next ones)."""
        v = torch.cat([values, values]) if self.guided else values
        z = self.model.step(v.to(self.model.dtype), self.cache)
        self.fed += values.shape[1]
        self.passes += 1
        return z

    def truncate(self, n: int) -> None:
        """Keep the inputs at positions ``< n`` (a cache holding fewer is caught up by the next ``feed``)."""
        if n < self.fed:
            self.cache.truncate(self.model.prefix_length + n)
            self.fed = n

    def split(self, z: Tensor, params) -> tuple[Tensor, Tensor | None]:
        use = self.guided and params.guidance_scale != 1.0
        return z[:self.b], (z[self.b:] if use else None)

    def log_prob(self, x: Tensor, z: Tensor, params) -> Tensor:
        zc, zu = self.split(z, params)
        return self.model.output_head.log_prob(x, zc, params, zu)

    def sample(self, z: Tensor, params, generator) -> Tensor:
        zc, zu = self.split(z, params)
        return self.model.output_head.sample(zc, params, generator, z_uncond=zu).float()


class ContinuousSD(Decoding):
    """Speculative decoding of continuous tokens with a draft RasterAR (see the module docstring).

    Args:
        draft: a RasterAR over the same continuous TokenSpec as the target, with a ``log_prob`` head.
        gamma: ``>= 1`` draft tokens per round.
        max_residual_tries: cap on the proposals of one residual draw (see the module docstring).
    """

    supports = ("raster_ar",)

    def __init__(self, draft, gamma: int = 4, max_residual_tries: int = 100_000):
        super().__init__()
        self.gamma = validate_int("gamma", gamma)
        self.max_residual_tries = validate_int("max_residual_tries", max_residual_tries)
        self._check_one(draft, "draft")
        self.draft = draft

    def __repr__(self) -> str:
        return f"ContinuousSD(draft={type(self.draft).__name__}, gamma={self.gamma})"

    def _check_one(self, model, what: str) -> None:
        name = getattr(type(model), "registry_name", type(model).__name__)
        if name not in self.supports:
            raise ValueError(f"ContinuousSD: the {what} must be a RasterAR ('raster_ar'), got {type(model).__name__} "
                             f"({name!r})")
        if model.spec.kind != "continuous":
            raise ValueError(f"ContinuousSD: the {what} must generate 'continuous' tokens, got "
                             f"kind={model.spec.kind!r} ({model.spec}); use SJD for index tokens")
        if not hasattr(model.output_head, "log_prob"):
            raise ValueError(f"ContinuousSD: the {what}'s head {type(model.output_head).__name__} has no tractable "
                             f"density (log_prob); exact continuous speculative decoding needs head='gaussian' "
                             f"(diffusion/flow trajectory densities are not implemented)")

    def check_model(self, model) -> None:
        self._check_one(model, "target")
        if model.spec != self.draft.spec:
            raise ValueError(f"ContinuousSD: draft and target must share the TokenSpec, got draft {self.draft.spec} "
                             f"and target {model.spec}")
        if model.condition_kind != self.draft.condition_kind:
            raise ValueError(f"ContinuousSD: draft and target must take the same condition, got draft "
                             f"{self.draft.condition_kind!r} and target {model.condition_kind!r}")

    def generate(self, model, cond, params, generator, **options) -> Tokens:
        if options:
            raise ValueError(f"ContinuousSD takes no options {sorted(options)}")
        cond = model.as_condition(cond)
        self.draft.as_condition(cond)
        b = cond.batch_size
        check_rows(params, generator, b)
        guided = params.uses_guidance
        if guided and model.condition_kind == "none":
            raise ValueError(f"guidance needs a conditional generator; condition='none' "
                             f"(guidance_scale={params.guidance_scale})")
        draft_was_training = self.draft.training
        self.draft.eval()
        try:
            values = self._run(model, cond, params, generator, guided)
        finally:
            self.draft.train(draft_was_training)
        return Tokens(values.to(model.dtype), model.spec)

    def _run(self, model, cond, params, generator, guided: bool) -> Tensor:
        spec, dev = model.spec, model.device
        length, b = spec.length, cond.batch_size
        cond = cond.to(dev)
        tgt, drf = _Runner(model, cond, guided), _Runner(self.draft, cond, guided)
        at = [params.at_step(t, length) for t in range(length)]
        values = torch.zeros(b, length, spec.dim, device=dev)
        values[:, 0] = tgt.sample(tgt.z0, at[0], generator)
        committed = torch.ones(b, dtype=torch.long, device=dev)
        rows = torch.arange(b, device=dev)
        proposed = accepted = 0
        c = 1
        while c < length:
            g = min(self.gamma, length - c)
            # -- draft: catch up to position c-1, then propose positions c..c+g-1
            z = drf.feed(values[:, drf.fed:c])[:, -1] if drf.fed < c else None
            log_q = torch.zeros(b, g, device=dev)
            z_draft = []
            for j in range(g):
                pos = c + j
                if j > 0:
                    z = drf.feed(values[:, pos - 1:pos])[:, -1]
                z_draft.append(z)
                x = drf.sample(z, at[pos], generator)
                free = pos >= committed  # rows whose token here is not final yet
                values[:, pos] = torch.where(free[:, None], x, values[:, pos])
                log_q[:, j] = drf.log_prob(values[:, pos], z, at[pos])
            # -- target: one pass over positions c-1..c+g-1 (the last only for a bonus position)
            n_feed = g + (1 if c + g < length else 0)
            zt = tgt.feed(values[:, c - 1:c - 1 + n_feed])  # [B', n_feed, C]: predicts positions c..c+n_feed-1
            log_p = torch.stack([tgt.log_prob(values[:, c + j], zt[:, j], at[c + j]) for j in range(g)], 1)
            u = row_uniforms(generator, b, dev, per_row=g)
            forced = torch.arange(c, c + g, device=dev)[None] < committed[:, None]  # [B, g]
            ok = forced | (u < (log_p - log_q).double().exp())
            n_acc = torch.cumprod(ok.long(), 1).sum(1)  # leading accepted drafts per row
            free_seen = ~forced & (torch.arange(g, device=dev)[None] <= n_acc[:, None])
            proposed += int(free_seen.sum())
            accepted += int((free_seen & ok).sum())
            new_committed = torch.maximum(committed, c + n_acc)
            # -- first rejection: residual draw at position c + n_acc (rows with n_acc < g)
            rej = n_acc < g
            if bool(rej.any()):
                j_rej = n_acc.clamp(max=g - 1)
                self._residual(tgt, drf, zt, z_draft, values, c, j_rej, rej, at, generator)
                new_committed = torch.where(rej, c + n_acc + 1, new_committed)
            # -- bonus token: every draft accepted and a position left
            bonus = ~rej & (c + g < length) & (new_committed == c + g)
            if bool(bonus.any()):
                x = tgt.sample(zt[:, g], at[c + g], generator)
                values[rows[bonus], c + g] = x[bonus]
                new_committed = torch.where(bonus, c + g + 1, new_committed)
            committed = new_committed
            c = int(committed.min())
            tgt.truncate(c - 1)
            drf.truncate(c - 1)
        self.last_stats = {"forward_passes": tgt.passes, "draft_passes": drf.passes, "tokens": length, "rows": b,
                           "proposed": proposed, "accepted": accepted,
                           "acceptance_rate": accepted / proposed if proposed else float("nan")}
        return values

    def _residual(self, tgt, drf, zt, z_draft, values, c, j_rej, rej, at, generator) -> None:
        """Redraw ``values[r, c + j_rej[r]]`` for rows ``rej`` from ``∝ max(0, p_t − p_d)`` by rejection."""
        b, dev = values.shape[0], values.device
        rows = torch.arange(b, device=dev)
        pending = rej.clone()
        for j in sorted({int(v) for v in j_rej[rej]}):  # rows grouped by the rejected window slot
            here = pending & (j_rej == j)
            pos = c + j
            tries = 0
            while bool(here.any()):
                if tries >= self.max_residual_tries:
                    raise RuntimeError(f"ContinuousSD: residual draw at position {pos} found no sample in "
                                       f"{tries} tries (max_residual_tries); p_target ≈ p_draft there")
                y = tgt.sample(zt[:, j], at[pos], generator)
                lp, lq = tgt.log_prob(y, zt[:, j], at[pos]), drf.log_prob(y, z_draft[j], at[pos])
                keep_prob = (1.0 - (lq - lp).double().exp()).clamp(min=0.0)
                u = row_uniforms(generator, b, dev)[:, 0]
                take = here & (u < keep_prob)
                values[rows[take], pos] = y[take]
                here &= ~take
                tries += 1
