"""Continuous speculative decoding (CSpD; Wang et al. 2024) for RasterAR over continuous tokens: draft + target model.

Each round, the draft model proposes ``gamma`` tokens one after another; each proposal is a *variable*
``V_j ~ p_d(· | prefix, tokens_<j)`` whose last entry is the token (:mod:`.trajectory`): the token itself for the
``"gaussian"`` head, the whole denoising trajectory ``(x_S, …, x_1, y)`` for the ``"diffusion"`` head. The target
scores all of them (and one position more) in a single backbone pass plus head evaluations; ``V_j`` is accepted with
probability ``min(1, p_t(V_j) / p_d(V_j))``, left to right. At the first rejection the variable is redrawn from the
residual ``r ∝ max(0, p_t − p_d)`` by rejection sampling — draw ``V ~ p_t`` with the target's sampler, keep it with
probability ``max(0, 1 − p_d(V) / p_t(V))`` — and the round ends; when all ``gamma`` drafts are accepted the
target's extra position gives a bonus token from its sampler. The first token comes from the target's prefill.

What is exact: the committed variables follow the target's law over ``V`` (speculative sampling, Leviathan et al.
2023, holds for densities: the accepted mass is ``min(p_t, p_d)`` and the residual supplies ``p_t − min(p_t, p_d)``;
the rejection step draws from the residual exactly because ``max(0, p_t − p_d) <= p_t``, with acceptance rate
``TV(p_t, p_d)`` per try). The token is a coordinate of ``V`` and is exactly what is fed to the next position, so the
tokens follow the target model's joint distribution, for any draft and any ``gamma``:

* ``"gaussian"`` head: ``V`` = the token, density ``log_prob`` (closed form).
* ``"diffusion"`` head: ``V = (x_S, …, x_2, y)``, every stochastic DDPM step a Gaussian and the deterministic last
  step ``y = f(x_1)`` handled by a change of variables; see :mod:`.trajectory` for the density and the proof.
  Needs the same number of denoising steps in both heads, ``noise_temperature > 0`` and ``clip_denoised=None``.

Guidance and temperature enter both densities exactly as the heads' ``sample`` uses them (guided output, each
head's own ``noise_temperature``; params of position ``t`` are ``params.at_step(t, L)``). ``tests/test_decoding_
continuous.py`` checks the output law (KS tests against the target's own sampler) and that a biased variant fails.

What is not exact / not done:

* The residual draw is capped at ``max_residual_tries`` proposals per token; if a row exhausts it a ``RuntimeError``
  is raised (never a silent biased token). A row reaches the residual with probability ``TV`` and needs ``1/TV``
  tries on average, so the chance of the error is at most ``~1 / (e · max_residual_tries)`` per token.
* Flow heads are accepted with ``solver="sde"`` (Euler–Maruyama trajectories, :class:`~.trajectory.FlowLaw`);
  their ``"euler"`` / ``"heun"`` samplers are deterministic ODEs and refused (clear error).
* Float densities: ``p_t / p_d`` is ``exp(log p_t − log p_d)`` in float64 of float32 head outputs; the diffusion
  and flow laws also invert ``f`` to a residual of ``1e-6 · (1 + |y|)``. Rounding and that residual are the only
  departures.

Batches: rows accept different numbers of tokens. A round starts at the least advanced row; positions a row already
committed are fed again as forced drafts and count as accepted (they are final), so every row is exact; the batch
takes as many rounds as its slowest row. ``last_stats``: ``forward_passes`` (target backbone calls, prefill
included), ``draft_passes``, ``proposed`` / ``accepted`` (non-forced drafts), ``acceptance_rate``, and the head cost
apart from the backbone: ``target_head_evals`` / ``draft_head_evals`` (one head network evaluation of one token at
one denoising step; a guided pair counts once), ``target_head_jacobians`` / ``draft_head_jacobians`` (Jacobians of
the last step, ``D`` backward passes each), ``*_head_calls`` (batched network calls) and
``sequential_head_evals`` (what one-token-per-pass decoding evaluates: ``B · L · steps``).

Written here because CSpD targets MAR-style diffusion heads through their denoising trajectories, and we need the
exact variant batched over rows with different acceptance counts, on RasterAR's KV caches (``step`` with several
tokens, ``KVCache.truncate``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokenloom.generators.decoding.base import Decoding, check_rows, validate_int
from tokenloom.generators.decoding.trajectory import TokenLaw, law_for
from tokenloom.kernels import row_uniforms
from tokenloom.kernels.checks import PER_ROW_FIELDS
from tokenloom.tokens import Tokens


class _Runner:
    """One model (draft or target) with its KV cache and token law; ``z`` rows ``[B']`` (``2B`` when guided)."""

    def __init__(self, model, cond, guided: bool, law: TokenLaw):
        self.model, self.guided, self.law = model, guided, law
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
        """``z: [B', C]`` of any ``n`` rows (``[2n, C]`` when guided) → ``(cond [n, C], uncond [n, C] or None)``."""
        if not self.guided:
            return z, None
        zc, zu = z.chunk(2)
        return zc, (zu if params.guidance_scale != 1.0 else None)

    def rows(self, z: Tensor, idx: Tensor) -> Tensor:
        """The rows ``idx`` of ``z: [B', C]`` (with their guidance rows)."""
        return torch.cat([z[idx], z[self.b + idx]]) if self.guided else z[idx]

    def draw(self, z: Tensor, params, generator, with_log_prob: bool = True) -> tuple[Tensor, Tensor | None]:
        """``(V [B, K, D], log p(V) [B] or None)`` from this model's sampler."""
        zc, zu = self.split(z, params)
        return self.law.sample(zc, zu, params, generator, with_log_prob)

    def log_prob(self, v: Tensor, z: Tensor, params) -> Tensor:
        zc, zu = self.split(z, params)
        return self.law.log_prob(v, zc, zu, params)

    def token(self, z: Tensor, params, generator) -> Tensor:
        """``[B, D]``: one token from the head's own ``sample``."""
        zc, zu = self.split(z, params)
        self.law.count_sample(zc.shape[0], params)
        return self.model.output_head.sample(zc, params, generator, z_uncond=zu).float()


class ContinuousSD(Decoding):
    """Speculative decoding of continuous tokens with a draft RasterAR (see the module docstring).

    Args:
        draft: a RasterAR over the same continuous TokenSpec as the target, with a ``"gaussian"`` or ``"diffusion"``
            head (the same kind as the target's).
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

    def law(self, model, what: str) -> TokenLaw:
        """The token law of ``model``'s head (``what``: "draft" / "target")."""
        return law_for(model.output_head, what)

    def _check_one(self, model, what: str) -> None:
        name = getattr(type(model), "registry_name", type(model).__name__)
        if name not in self.supports:
            raise ValueError(f"ContinuousSD: the {what} must be a RasterAR ('raster_ar'), got {type(model).__name__} "
                             f"({name!r})")
        if model.spec.kind != "continuous":
            raise ValueError(f"ContinuousSD: the {what} must generate 'continuous' tokens, got "
                             f"kind={model.spec.kind!r} ({model.spec}); use SJD for index tokens")
        self.law(model, what)

    def check_model(self, model) -> None:
        self._check_one(model, "target")
        if model.spec != self.draft.spec:
            raise ValueError(f"ContinuousSD: draft and target must share the TokenSpec, got draft {self.draft.spec} "
                             f"and target {model.spec}")
        if model.condition_kind != self.draft.condition_kind:
            raise ValueError(f"ContinuousSD: draft and target must take the same condition, got draft "
                             f"{self.draft.condition_kind!r} and target {model.condition_kind!r}")
        head_t, head_d = type(model.output_head), type(self.draft.output_head)
        if head_t is not head_d:
            raise ValueError(f"ContinuousSD: draft and target heads must sample the same kind of variable, got draft "
                             f"{head_d.__name__} and target {head_t.__name__}")

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
        law_t, law_d = self.law(model, "target"), self.law(self.draft, "draft")
        for t in range(model.spec.length):
            at = params.at_step(t, model.spec.length)
            k_t, k_d = law_t.size(at), law_d.size(at)
            if k_t != k_d:
                raise ValueError(f"ContinuousSD: draft and target must sample variables of the same size; with "
                                 f"params.num_steps={params.num_steps} the target's head takes {k_t - 1} denoising "
                                 f"steps and the draft's {k_d - 1} (set params.num_steps or equal "
                                 f"num_sampling_steps)")
        draft_was_training = self.draft.training
        self.draft.eval()
        try:
            values = self._run(model, cond, params, generator, guided, law_t, law_d)
        finally:
            self.draft.train(draft_was_training)
        return Tokens(values.to(model.dtype), model.spec)

    def _run(self, model, cond, params, generator, guided: bool, law_t: TokenLaw, law_d: TokenLaw) -> Tensor:
        spec, dev = model.spec, model.device
        length, b = spec.length, cond.batch_size
        cond = cond.to(dev)
        tgt, drf = _Runner(model, cond, guided, law_t), _Runner(self.draft, cond, guided, law_d)
        at = [params.at_step(t, length) for t in range(length)]
        values = torch.zeros(b, length, spec.dim, device=dev)
        values[:, 0] = tgt.token(tgt.z0, at[0], generator)
        committed = torch.ones(b, dtype=torch.long, device=dev)
        rows = torch.arange(b, device=dev)
        proposed = accepted = 0
        c = 1
        while c < length:
            g = min(self.gamma, length - c)
            # -- draft: catch up to position c-1, then propose positions c..c+g-1
            z = drf.feed(values[:, drf.fed:c])[:, -1] if drf.fed < c else None
            log_q = torch.zeros(b, g, dtype=torch.float64, device=dev)
            z_draft, drafts = [], []
            for j in range(g):
                pos = c + j
                if j > 0:
                    z = drf.feed(values[:, pos - 1:pos])[:, -1]
                z_draft.append(z)
                v, log_q[:, j] = drf.draw(z, at[pos], generator)
                drafts.append(v)
                free = pos >= committed  # rows whose token here is not final yet
                values[:, pos] = torch.where(free[:, None], v[:, -1], values[:, pos])
            # -- target: one pass over positions c-1..c+g-1 (the last only for a bonus position), then its head
            n_feed = g + (1 if c + g < length else 0)
            zt = tgt.feed(values[:, c - 1:c - 1 + n_feed])  # [B', n_feed, C]: predicts positions c..c+n_feed-1
            log_p = torch.stack([tgt.log_prob(drafts[j], zt[:, j], at[c + j]) for j in range(g)], 1)
            u = row_uniforms(generator, b, dev, per_row=g)
            forced = torch.arange(c, c + g, device=dev)[None] < committed[:, None]  # [B, g]
            ok = forced | (u < (log_p - log_q).exp())
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
                x = tgt.token(zt[:, g], at[c + g], generator)
                values[rows[bonus], c + g] = x[bonus]
                new_committed = torch.where(bonus, c + g + 1, new_committed)
            committed = new_committed
            c = int(committed.min())
            tgt.truncate(c - 1)
            drf.truncate(c - 1)
        self.last_stats = {"forward_passes": tgt.passes, "draft_passes": drf.passes, "tokens": length, "rows": b,
                           "proposed": proposed, "accepted": accepted,
                           "acceptance_rate": accepted / proposed if proposed else float("nan"),
                           "target_head_evals": law_t.evals, "draft_head_evals": law_d.evals,
                           "target_head_jacobians": law_t.jacobians, "draft_head_jacobians": law_d.jacobians,
                           "target_head_calls": law_t.calls, "draft_head_calls": law_d.calls,
                           "sequential_head_evals": b * sum(law_t.evals_per_token(p) for p in at)}
        return values

    def _residual(self, tgt, drf, zt, z_draft, values, c, j_rej, rej, at, generator) -> None:
        """Redraw ``values[r, c + j_rej[r]]`` for rows ``rej`` from ``∝ max(0, p_t − p_d)`` by rejection.

        Each try draws and scores only the rows still pending (with their generators and per-row params)."""
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
                idx = rows[here]
                gen = [generator[i] for i in idx.tolist()] if isinstance(generator, (list, tuple)) else generator
                p = at[pos]
                p = p.replace(**{name: getattr(p, name)[idx] for name in PER_ROW_FIELDS
                                 if isinstance(getattr(p, name), Tensor)})
                v, lp = tgt.draw(tgt.rows(zt[:, j], idx), p, gen)
                lq = drf.log_prob(v, drf.rows(z_draft[j], idx), p)
                keep_prob = (1.0 - (lq - lp).exp()).clamp(min=0.0)
                take = row_uniforms(gen, len(idx), dev)[:, 0] < keep_prob
                values[idx[take], pos] = v[take, -1]
                here[idx[take]] = False
                tries += 1
