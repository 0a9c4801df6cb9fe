"""Sampling of :class:`~tokenloom.generators.masked_ar.MaskedAR`: ``generate`` (a mixin of the model).

Generation (``generate``): ``N = params.num_steps`` iterations, one backbone pass each (batch doubled for
guidance). After step ``s`` the ``mask_len_s`` = ``clamp(floor(L·cos(π/2·(s+1)/N)), 1, masked − 1)`` positions stay
masked (MAR/MaskGIT's cosine schedule); the last step reveals the rest. Which positions (``reveal``):

* ``"order"`` (MAR): a random order per row is drawn up front; positions stay masked while they are among the
  first ``mask_len_s`` of the order. Only the positions revealed at a step go through the head.
* ``"confidence"`` (MaskGIT; heads with logits only): every masked position is sampled; the ``mask_len_s`` with the
  lowest confidence stay masked, confidence = log-probability of the sampled token under the model's guided logits
  (as MaskGIT, before temperature and truncation, so greedy sampling still ranks positions; summed over channels
  for bits) + ``remask_temperature·(1 − (s+1)/N)`` × Gumbel noise (MaskGIT's annealed ``choice_temperature``).

Guidance: step ``s`` uses ``params.at_step(s, N)``. tokenloom's ``GuidanceSchedule.linear(start=1)`` ramps over
``progress = s/(N − 1)``; MAR's ramp ``1 + (cfg − 1)·(L − mask_len_s)/L`` follows the masking schedule instead
(not linear in ``s``, and ``< cfg`` at the last step), so MAR's exact ramp is ``GuidanceSchedule.steps`` of
:func:`~tokenloom.generators.masked_ar_layers.mar_guidance_values` (what ``tokenloom.interop.mar`` emits).
``params.num_steps`` is the number of MAR iterations (default: ``num_steps`` of the config, else ``min(64, L)``);
a diffusion/flow head's own steps and ``noise_temperature`` are head options (``head_options``).

Inpainting (``generate(..., known=Tokens, known_mask=[B, L])``): generation starts from a partial mask — the
known positions are visible from the first pass and only the unknown ones are revealed, by the same schedule over
their count; known tokens come back unchanged.

Randomness: with a list of ``B`` generators, row ``i``'s order, Gumbel noise and head noise come from
``generator[i]`` alone, so an image does not depend on its batch neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenloom.config import SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.masked_ar_layers import (
    check_num_steps,
    first_of_order,
    masked_after_steps,
    random_orders,
    repeat_rows,
    row_rand,
)
from tokenloom.tokens import Tokens


class MaskedARGeneration:
    """``generate`` of :class:`~tokenloom.generators.masked_ar.MaskedAR`, its head sampling and argument checks."""

    def _check_generate_args(self, cond, params, generator, decoding):
        if decoding is not None:
            raise ValueError(f"decoding must be None for MaskedAR (it decodes num_steps sets of tokens), "
                             f"got {decoding!r}")
        cond, params = self.check_generate_args(cond, params, generator)
        steps = self.default_num_steps if params.num_steps is None else params.num_steps
        check_num_steps(steps, self.seq_len)
        if params.guidance_schedule.kind == "steps" and len(params.guidance_schedule.values) != steps:
            raise ValueError(f"GuidanceSchedule.values has {len(params.guidance_schedule.values)} entries but the "
                             f"generation takes num_steps={steps}")
        return cond, params, steps

    def _sample_at(self, z: Tensor, z_uncond: Tensor | None, params: SamplingParams, generator, rows: int,
                   per_row: int) -> Tensor:
        """Head samples ``[rows·per_row, channels]`` for ``z: [rows·per_row, Dd]`` (rows in batch order)."""
        p, gens = repeat_rows(params.replace(num_steps=None), generator, per_row)
        return self.output_head.sample(z, p, gens, z_uncond=z_uncond)

    def _sample_with_confidence(self, z: Tensor, z_uncond: Tensor | None, params: SamplingParams, generator,
                                rows: int, per_row: int) -> tuple[Tensor, Tensor]:
        """Codes ``[rows·per_row, channels]`` and their confidence ``[rows, per_row]``: the log-probability of the
        drawn code under the guided logits (MaskGIT: before temperature and truncation), summed over channels."""
        head = self.output_head
        p, gens = repeat_rows(params.replace(num_steps=None), generator, per_row)
        logits = head.logits(z)
        u_logits = None if z_uncond is None or p.guidance_scale == 1.0 else head.logits(z_uncond)
        codes = head.sample_logits(logits, p, gens, u_logits)
        guided = logits if u_logits is None else u_logits + p.guidance_scale * (logits - u_logits)
        logp = guided.log_softmax(-1).gather(-1, codes.long()[..., None])[..., 0]  # [N, channels]
        return codes, logp.view(rows, per_row, -1).sum(-1)

    @torch.no_grad()
    def generate(
        self,
        cond: Condition | Tensor | None,
        params: SamplingParams | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        decoding=None,
        progress: bool = False,
        *,
        known: Tokens | None = None,
        known_mask: Tensor | None = None,
    ) -> Tokens:
        """Sample ``Tokens`` in ``params.num_steps`` backbone passes (see the module docstring).

        Args:
            cond: labels ``[B]``, text features or a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            params: sampling params; step ``s`` of ``N`` uses ``params.at_step(s, N)`` (guidance), the categorical
                fields (temperature, top-k/p, min-p) act on index/bits logits; ``num_steps`` = MAR iterations.
            generator: one ``torch.Generator`` or a list of ``B`` (row ``i`` then depends only on its own).
            decoding: must be None.
            progress: show a tqdm bar over the iterations.
            known, known_mask: inpainting — ``Tokens`` of this spec and ``[B, L]`` bool (True = keep). Generation
                starts from a partial mask: backbone positions (patches) whose every token is known are visible from
                the first pass; the others are revealed by MAR's schedule over the ``U`` unknown positions
                (``num_steps`` is capped at ``U``; every row needs the same ``U``). Known tokens come back unchanged.
        """
        cond, params, steps = self._check_generate_args(cond, params, generator, decoding)
        b, length = cond.batch_size, self.seq_len
        known_data, patch_known = self._check_known(known, known_mask, b)
        kind = self.patch_spec.kind
        tokens = torch.zeros(b, length, self.token_dim, device=self.device,
                             dtype=self.dtype if kind == "continuous" else torch.long)
        mask = torch.ones(b, length, dtype=torch.bool, device=self.device)
        if patch_known is not None:
            tokens = torch.where(patch_known[..., None], self.to_patches(known_data).to(tokens.dtype), tokens)
            mask = ~patch_known
        unknown = int(mask[0].sum()) if b else 0
        if unknown == 0:
            return Tokens(known_data.data.clone(), self.spec)
        if unknown < steps:
            steps = unknown
            if params.guidance_schedule.kind == "steps":
                raise ValueError(f"GuidanceSchedule.values has {len(params.guidance_schedule.values)} entries but "
                                 f"only {unknown} positions are unknown, so generation takes {unknown} steps")
        guided = params.uses_guidance
        buffer = self.buffer(cond, guided, drop=False)
        confidence = self.config.reveal == "confidence"
        orders = None if confidence else random_orders(generator, b, length, self.device)
        if orders is not None and patch_known is not None:  # unknown positions first, in their random order
            orders = orders.gather(1, patch_known.gather(1, orders).long().argsort(dim=1, stable=True))
        remaining = masked_after_steps(unknown, steps)
        for s in tqdm(range(steps), disable=not progress, desc="masked_ar", leave=False):
            x_in, m_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = self.backbone(x_in, m_in, buffer)
            p = params.at_step(s, steps)
            use_uncond = guided and p.guidance_scale != 1.0
            if confidence:
                masked = int(mask[0].sum())
                codes, logp = self._sample_with_confidence(
                    z[:b][mask], z[b:][mask] if use_uncond else None, p, generator, b, masked)
                temp = self.config.remask_temperature * (1.0 - (s + 1) / steps)
                u = row_rand(generator, b, masked, self.device).clamp(1e-20, 1 - 1e-7)
                score = logp + temp * -torch.log(-torch.log(u))  # [B, masked]
                positions = mask.nonzero()[:, 1].view(b, masked)
                low = score.argsort(dim=1, stable=True)[:, :remaining[s]]
                mask_next = torch.zeros_like(mask).scatter_(1, positions.gather(1, low), True)
                revealed = ~mask_next.gather(1, positions)  # [B, masked]
                tokens[mask & ~mask_next] = codes.view(b, masked, -1)[revealed].to(tokens.dtype)
            else:
                mask_next = first_of_order(orders, remaining[s])
                to_pred = mask & ~mask_next
                per_row = int(to_pred[0].sum())
                values = self._sample_at(z[:b][to_pred], z[b:][to_pred] if use_uncond else None, p, generator,
                                         b, per_row)
                tokens[to_pred] = values.to(tokens.dtype)
            mask = mask_next
        out = self.from_patches(tokens)
        if known_data is not None:
            out = torch.where(known_mask.to(self.device)[..., None], known_data.data.to(out), out)
        return Tokens(out, self.spec)

    def _check_known(self, known, known_mask, b: int) -> tuple[Tokens | None, Tensor | None]:
        """Inpainting inputs → ``(known tokens, [B, seq_len] bool: backbone positions whose every token is known)``."""
        known, known_mask = self.check_known(known, known_mask, b)
        if known is None:
            return None, None
        p = self.config.patch_size
        patch_known = known_mask
        if p > 1:
            h, w = self.spec.layout.h, self.spec.layout.w
            patch_known = known_mask.view(b, h // p, p, w // p, p).all(dim=4).all(dim=2).flatten(1)
        counts = (~patch_known).sum(1)
        if b and not bool((counts == counts[0]).all()):
            raise ValueError(f"MaskedAR needs the same number of unknown positions in every row of known_mask, got "
                             f"{counts.tolist()}; generate rows with different masks separately")
        return known.to(self.device), patch_known


__all__ = ["MaskedARGeneration"]
