"""Sampling of :class:`~tokenloom.generators.random_order.RandomOrderAR`: ``generate`` (a mixin of the model).

Generation (``generate``): RandAR's parallel decoding with a KV cache. Step ``s`` feeds ``k_s`` instruction tokens at
once, samples their ``k_s`` tokens from the ``k_s`` hidden states, and the next step feeds those tokens interleaved with
their instructions (RandAR drops the re-fed instructions' keys from the cache and writes them again, except the first
one's, which already saw exactly the interleaved context), so the cache always holds the training layout. Queries of one
step attend causally to each other (RandAR). ``k_s`` follows RandAR's cosine schedule over ``params.num_steps`` steps
(:func:`~tokenloom.generators.random_order_layers.randar_tokens_per_step`) or an explicit ``tokens_per_step``; one
backbone pass per step (the prefix goes into the first). Guidance doubles the batch (null condition rows);
step ``s`` uses ``params.at_step(s, steps)`` (RandAR's ramp over decoded tokens:
:func:`~tokenloom.generators.random_order_layers.randar_guidance_values` with ``GuidanceSchedule.steps``).

Inpainting / outpainting (``generate(..., known=Tokens, known_mask=[B, L])``): every row's order puts its known
positions first (random among themselves), teacher-forced in the first pass; then the unknown positions in random
order. Rows with more known tokens than the fewest in the batch teacher-force the extra ones where the schedule reaches
them (their sampled values are replaced). Known tokens come back unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tokenloom.config import SamplingParams
from tokenloom.generators.condition import Condition
from tokenloom.generators.random_order_layers import (
    generation_orders,
    known_first,
    per_token,
    randar_tokens_per_step,
)
from tokenloom.tokens import Tokens

ORDERS = ("random", "raster")


class RandomOrderGeneration:
    """``generate`` of :class:`~tokenloom.generators.random_order.RandomOrderAR` and its argument checks."""

    def _check_known(self, known, known_mask, b: int) -> tuple[Tensor | None, Tensor | None]:
        known, known_mask = self.check_known(known, known_mask, b)
        return (None, None) if known is None else (known.data.to(self.device), known_mask)

    def _check_generate_args(self, cond, params, generator, decoding):
        if decoding is not None:
            raise ValueError(f"decoding must be None for RandomOrderAR (parallel decoding is set by "
                             f"params.num_steps / tokens_per_step), got {decoding!r}")
        return self.check_generate_args(cond, params, generator)

    def _schedule(self, remaining: int, params: SamplingParams, tokens_per_step) -> list[int]:
        length = self.spec.length
        if tokens_per_step is not None:
            counts = [int(k) for k in tokens_per_step]
            if any(k < 1 for k in counts) or sum(counts) != remaining:
                raise ValueError(f"tokens_per_step must be positive ints summing to the {remaining} tokens to "
                                 f"generate, got {list(tokens_per_step)} (sum {sum(counts)})")
            schedule = counts
        else:
            steps = params.num_steps if params.num_steps is not None else self.config.num_steps
            if steps is None:
                steps = remaining
            if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= length:
                raise ValueError(f"num_steps must be an int in [1, {length}] (the tokens the layout holds), got "
                                 f"{steps!r}")
            schedule = randar_tokens_per_step(remaining, min(steps, remaining))
        if not self.uses_instructions and any(k != 1 for k in schedule):
            raise ValueError(f"order_signal='target_aware' (RAR) decodes one token per step; got tokens per step "
                             f"{schedule}")
        gs = params.guidance_schedule
        if gs.kind == "steps" and len(gs.values) != len(schedule):
            raise ValueError(f"GuidanceSchedule.values has {len(gs.values)} entries but the generation takes "
                             f"{len(schedule)} steps")
        return schedule

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
        order: str | Tensor | None = None,
        tokens_per_step: list[int] | None = None,
    ) -> Tokens:
        """Sample ``Tokens`` of this spec with RandAR's parallel decoding (one backbone pass per step).

        Args:
            cond: labels ``[B]``, text features or a :class:`Condition` (``Condition(batch=B)`` when unconditional).
            params: sampling params; step ``s`` of ``S`` uses ``params.at_step(s, S)``; ``num_steps`` is the number of
                decoding steps ``S`` (None: the config's ``num_steps``, else one token per step); a diffusion/flow
                head's own steps are head options.
            generator: one ``torch.Generator`` or a list of ``B`` (row ``i``'s order and tokens depend only on its own).
            decoding: None (RandAR's parallel decoding) or a ``tokenloom.generators.decoding`` algorithm (SJD,
                LANTERN, GroupedSD), which samples the one-token-per-step joint in the row's ``order``.
            progress: show a tqdm bar over the steps.
            known, known_mask: inpainting — ``Tokens`` of this spec and ``[B, L]`` bool (True = keep); known tokens are
                ordered first and come back unchanged.
            order: ``"random"``, ``"raster"`` or ``[B, L]`` permutations (None: the config's ``inference_order``).
            tokens_per_step: explicit tokens decoded per step (sums to the tokens to generate); overrides num_steps.
        """
        if decoding is not None:  # speculative decoders: tokenloom.generators.decoding
            from tokenloom.generators.decoding import run_decoding

            if known is not None or known_mask is not None or tokens_per_step is not None:
                raise ValueError(f"known/known_mask/tokens_per_step are not supported with decoding={decoding!r}")
            return run_decoding(decoding, self, cond, params, generator, order=order)
        cond, params = self._check_generate_args(cond, params, generator, decoding)
        b, length, channels = cond.batch_size, self.spec.length, self.spec.channels
        known_data, known_mask = self._check_known(known, known_mask, b)
        order = self.config.inference_order if order is None else order
        if isinstance(order, Tensor):
            orders = self._check_orders(order, b)
            orders = orders if known_mask is None else known_first(orders, known_mask)
        elif order in ORDERS:
            orders = generation_orders(generator, b, length, self.device, order == "random", known_mask)
        else:
            raise ValueError(f"order must be one of {ORDERS} or a [B, L] tensor, got {order!r}")
        n_known = 0 if known_mask is None else int(known_mask.sum(1).min())
        values = torch.zeros(b, length, channels, device=self.device, dtype=self._value_dtype)
        if known_data is not None:
            known_in_order = known_data.gather(1, orders[..., None].expand(-1, -1, channels))
            known_flag = known_mask.gather(1, orders)  # [B, L] in order
            values[:, :n_known] = known_in_order[:, :n_known]
        if n_known == length:
            return Tokens(known_data.clone(), self.spec)
        schedule = self._schedule(length - n_known, params, tokens_per_step)

        guided = params.uses_guidance
        twice = (lambda t: torch.cat([t, t])) if guided else (lambda t: t)
        prefix = self.embed_prefix(cond, guided, drop=False)
        cache = self.new_cache(prefix.x.shape[0])
        done = n_known
        z = self.prefill(prefix, cache, twice(orders[:, :done]), twice(values[:, :done]),
                         twice(orders[:, done:done + schedule[0]]))
        for s, k in enumerate(tqdm(schedule, disable=not progress, desc="random_order_ar", leave=False)):
            p = params.at_step(s, len(schedule)).replace(num_steps=None)
            z_cond = z[:b].flatten(0, 1)
            z_uncond = z[b:].flatten(0, 1) if guided and p.guidance_scale != 1.0 else None
            p_tok, g_tok = per_token(p, generator, k)
            sampled = self.output_head.sample(z_cond, p_tok, g_tok, z_uncond=z_uncond).view(b, k, channels)
            if known_data is not None:
                flag = known_flag[:, done:done + k, None]
                sampled = torch.where(flag, known_in_order[:, done:done + k], sampled.to(values.dtype))
            values[:, done:done + k] = sampled.to(values.dtype)
            done += k
            if s + 1 < len(schedule):
                nxt = schedule[s + 1]
                z = self.step(cache, twice(orders[:, done - k:done]), twice(values[:, done - k:done]),
                              twice(orders[:, done:done + nxt]))
        out = torch.empty_like(values).scatter_(1, orders[..., None].expand(-1, -1, channels), values)
        return Tokens(out, self.spec)


__all__ = ["ORDERS", "RandomOrderGeneration"]
