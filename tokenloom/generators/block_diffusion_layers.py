"""The non-model parts of block diffusion: the skip-causal layout and mask, and the denoising process per head.

**Layout.** A pass of the backbone reads a sequence of *segments*: the condition prefix (``P`` positions), a
*clean* copy of the tokens and a *noisy* copy. Every position carries ``(kind, block, index)``: ``kind`` is
:data:`PREFIX`, :data:`CLEAN` or :data:`NOISY`, ``block = position // block_size`` (-1 on the prefix) and ``index``
the prefix index or the token position. :func:`skip_causal_mask` states the attention rule once (ACDiT's SCAM,
BD3-LM's ``M_BD | M_OBC | M_BC``), for any query and key layouts:

* a prefix position sees the prefix positions up to itself (causal, as the raster AR's prefix);
* a clean token of block ``i`` sees the prefix and the clean tokens of blocks ``<= i`` (block-causal);
* a noisy token of block ``i`` sees the prefix, the clean tokens of blocks ``< i`` and the noisy tokens of block
  ``i`` (bidirectionally).

The training pass (:func:`training_layout`) is ``[prefix ; clean tokens 0..L-K-1 ; noisy tokens 0..L-1]``: the last
clean block is left out because no noisy block attends to it, so ``block_size = 1`` is teacher-forced AR over
``L - 1`` clean tokens and ``block_size = L`` is one bidirectional pass over the noisy sequence. A cached pass uses
the same rule with the cached positions as keys, so cached and full passes agree by construction (and by test).

**Processes** (one per head family; each knows how to noise a block for training and how to denoise it step by
step while sampling, the backbone being re-run between steps):

* :class:`MaskedProcess` — absorbing-state discrete diffusion (MDLM/BD3-LM) for ``index`` tokens with a categorical
  head.
* :class:`GaussianProcess` — the diffusion-loss head's DDPM chain with one timestep per block.
* :class:`FlowProcess` — the flow head's rectified flow with one time per block.

Per-row randomness: with a list of ``B`` generators, row ``i``'s reveal choices, token draws and head noise come from
``generator[i]`` alone (:func:`~tokenloom.generators.masked_ar_layers.repeat_rows` repeats each image's generator for
its tokens, in order).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

from tokenloom.config import SamplingParams
from tokenloom.generators.masked_ar_layers import repeat_rows, row_rand

PREFIX, CLEAN, NOISY = 0, 1, 2
LEVEL_SCALE = 1000.0  # noise levels in [0, 1] enter the sinusoidal features on a 0..1000 scale (diffusers' scale)
REVEALS = ("random", "confidence")
WEIGHTINGS = ("elbo", "mean")


# ----------------------------------------------------------------------------------------------------- layout
class Layout(NamedTuple):
    """Descriptors of ``T`` positions: ``kind``, ``block``, ``index``, each ``[T]`` long."""

    kind: Tensor
    block: Tensor
    index: Tensor

    @property
    def length(self) -> int:
        return self.kind.shape[0]

    def rope_rows(self, prefix_len: int) -> Tensor:
        """``[T]`` rows of a rope table that holds ``prefix_len`` prefix rows then one row per token position."""
        return torch.where(self.kind == PREFIX, self.index, self.index + prefix_len)


def cat_layouts(*layouts: Layout) -> Layout:
    return Layout(*(torch.cat([getattr(lay, f) for lay in layouts]) for f in Layout._fields))


def prefix_layout(prefix_len: int, device=None) -> Layout:
    """The ``P`` prefix positions."""
    idx = torch.arange(prefix_len, device=device)
    return Layout(torch.full_like(idx, PREFIX), torch.full_like(idx, -1), idx)


def token_layout(kind: int, start: int, count: int, block_size: int, device=None) -> Layout:
    """``count`` token positions ``start..start+count-1`` of ``kind`` (:data:`CLEAN` or :data:`NOISY`)."""
    if kind not in (CLEAN, NOISY):
        raise ValueError(f"kind must be CLEAN ({CLEAN}) or NOISY ({NOISY}), got {kind!r}")
    idx = torch.arange(start, start + count, device=device)
    return Layout(torch.full_like(idx, kind), idx // block_size, idx)


def training_layout(prefix_len: int, length: int, block_size: int, device=None) -> Layout:
    """``[prefix ; clean 0..L-K-1 ; noisy 0..L-1]`` (``T = P + 2L - K``)."""
    return cat_layouts(prefix_layout(prefix_len, device),
                       token_layout(CLEAN, 0, length - block_size, block_size, device),
                       token_layout(NOISY, 0, length, block_size, device))


def skip_causal_mask(q: Layout, k: Layout) -> Tensor:
    """``[Tq, Tk]`` bool, True where query ``q[i]`` may attend key ``k[j]`` (rule in the module docstring)."""
    qk, qb, qi = (t[:, None] for t in q)
    kk, kb, ki = (t[None, :] for t in k)
    prefix_key = kk == PREFIX
    allowed = torch.where(qk == PREFIX, prefix_key & (ki <= qi), prefix_key)
    allowed = allowed | ((qk == CLEAN) & (kk == CLEAN) & (kb <= qb))
    allowed = allowed | ((qk == NOISY) & (kk == CLEAN) & (kb < qb))
    return allowed | ((qk == NOISY) & (kk == NOISY) & (kb == qb))


# ----------------------------------------------------------------------------------------------------- checks
def check_block_size(block_size, length: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if length % block_size:
        raise ValueError(f"block_size={block_size} does not divide the sequence length L={length}; use a divisor "
                         f"of {length} (1 = pure AR, {length} = full-sequence diffusion)")
    return block_size


def check_masked_steps(num_steps, block_size: int) -> int:
    """Masked reveal: every step reveals at least one token, so ``1 <= num_steps <= block_size``."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= block_size:
        raise ValueError(f"num_steps={num_steps!r} denoising steps per block cannot each reveal a token of a block of "
                         f"block_size={block_size} masked tokens; use 1 <= num_steps <= {block_size}")
    return num_steps


def masked_after_steps(block_size: int, num_steps: int) -> list[int]:
    """Tokens of a block still masked after each of ``num_steps`` steps: ``floor(K·(S−s−1)/S)``.

    MDLM's linear schedule (``α_t = 1 − t``) on the uniform grid ``t_s = 1 − s/S``, with the expected number of
    reveals made exact; with ``S <= K`` every step reveals at least one token and the last step reveals the rest.
    """
    check_masked_steps(num_steps, block_size)
    return [block_size * (num_steps - s - 1) // num_steps for s in range(num_steps)]


# ----------------------------------------------------------------------------------------------------- embedding
class LevelEmbedding(nn.Module):
    """Noise level ``[...]`` in ``[0, 1]`` (0 = clean) → ``[..., C]``: diffusers' sinusoid + ``TimestepEmbedding``."""

    def __init__(self, width: int, frequency_channels: int = 256):
        super().__init__()
        self.frequencies = Timesteps(frequency_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(frequency_channels, width)

    def forward(self, level: Tensor) -> Tensor:
        feats = self.frequencies(level.flatten().float() * LEVEL_SCALE).to(self.mlp.linear_1.weight.dtype)
        return self.mlp(feats).unflatten(0, level.shape)


# ----------------------------------------------------------------------------------------------------- processes
class BlockState(NamedTuple):
    """A block being denoised: ``values`` (``[b, K]`` codes holding the mask id where masked, or ``[b, K, D]``
    floats), ``masked`` (``[b, K]`` bool, masked process only) and per-process data (reveal schedule, chain, times)."""

    values: Tensor
    masked: Tensor | None = None
    extra: object = None


class MaskedProcess:
    """Absorbing-state diffusion inside each block (MDLM, BD3-LM) for ``index`` tokens.

    Training: per (row, block) a mask ratio ``t`` (stratified over the batch as MDLM's antithetic sampling, in
    ``[t_min, t_max]`` as BD3-LM's clipped schedules); every token is masked with probability ``t``. Loss on the masked
    tokens: ``"elbo"`` weights each token's cross entropy by ``1/t`` and divides by the number of tokens (the NELBO of
    the linear schedule, as MDLM/BD3-LM); ``"mean"`` averages the cross entropy over masked tokens (MaskGIT).

    Sampling: ``S`` steps per block; after step ``s`` the :func:`masked_after_steps` count stays masked. ``"random"``
    reveals a uniformly random subset of the masked tokens, each drawn from the categorical head through
    ``tokenloom.kernels`` (MDLM's sampler with the number of reveals per step made exact); ``"confidence"`` draws every
    masked token and keeps the most confident (MaskGIT: log-probability under the guided logits + annealed Gumbel
    noise of ``remask_temperature``).
    """

    def __init__(self, head, mask_id: int, reveal: str, remask_temperature: float, t_min: float, t_max: float,
                 weighting: str):
        self.head, self.mask_id = head, mask_id
        self.reveal, self.remask_temperature = reveal, remask_temperature
        self.t_min, self.t_max, self.weighting = t_min, t_max, weighting

    # -- training
    def draw_levels(self, rows: int, blocks: int, generator, device) -> Tensor:
        """``[rows, blocks]`` mask ratios: stratified ``(u + i/n) mod 1`` over the ``n`` blocks, then shuffled."""
        n = rows * blocks
        gen_device = generator.device if generator is not None else device
        u = torch.rand((), generator=generator, device=gen_device)
        perm = torch.randperm(n, generator=generator, device=gen_device)
        strata = ((u + torch.arange(n, device=gen_device) / n) % 1.0)[perm].to(device)
        return (self.t_min + (self.t_max - self.t_min) * strata).view(rows, blocks)

    def noise(self, codes: Tensor, block_size: int, generator) -> tuple[Tensor, None, dict]:
        """``codes: [B, L]`` → noisy codes ``[B, L]`` (``mask_id`` where masked), no level, what :meth:`loss` needs."""
        b, length = codes.shape
        t = self.draw_levels(b, length // block_size, generator, codes.device).repeat_interleave(block_size, 1)
        gen_device = generator.device if generator is not None else codes.device
        masked = torch.rand((b, length), generator=generator, device=gen_device).to(codes.device) < t
        return torch.where(masked, self.mask_id, codes), None, {"t": t, "masked": masked}

    def loss(self, z: Tensor, codes: Tensor, info: dict) -> Tensor:
        """Scalar loss from ``z: [B, L, C]`` of the noisy stream and the clean ``codes: [B, L]``."""
        masked = info["masked"]
        if not bool(masked.any()):
            return z.sum() * 0.0  # no masked token in the batch: nothing to learn, keep the graph
        ce = self.head.loss(z[masked], codes[masked][:, None])
        if self.weighting == "elbo":
            return (ce / info["t"][masked]).sum() / masked.numel()
        return ce.mean()

    # -- sampling
    def start(self, rows: int, block_size: int, num_steps: int, generator, like: Tensor) -> BlockState:
        codes = torch.full((rows, block_size), self.mask_id, dtype=torch.long, device=like.device)
        schedule = masked_after_steps(block_size, num_steps)
        return BlockState(codes, torch.ones(rows, block_size, dtype=torch.bool, device=like.device), schedule)

    def noisy_input(self, state: BlockState, step: int) -> tuple[Tensor, None]:
        return state.values, None

    def step(self, state: BlockState, z: Tensor, z_uncond: Tensor | None, params: SamplingParams, step: int,
             generator) -> BlockState:
        """One reveal step; ``z``, ``z_uncond``: ``[b, K, C]``."""
        codes, masked, schedule = state
        b, k = codes.shape
        n_masked = int(masked[0].sum())
        n_reveal = n_masked - schedule[step]
        if self.reveal == "random":
            if n_reveal == n_masked:
                reveal = masked
            else:
                u = row_rand(generator, b, k, codes.device).masked_fill(~masked, 2.0)
                pick = u.argsort(dim=1, stable=True)[:, :n_reveal]
                reveal = torch.zeros_like(masked).scatter_(1, pick, True)
            p, gens = repeat_rows(params, generator, n_reveal)
            drawn = self.head.sample(z[reveal], p, gens, z_uncond=None if z_uncond is None else z_uncond[reveal])
            codes = codes.masked_scatter(reveal, drawn[:, 0])
            return BlockState(codes, masked & ~reveal, schedule)
        # confidence (MaskGIT)
        p, gens = repeat_rows(params, generator, n_masked)
        logits = self.head.logits(z[masked])
        u_logits = None if z_uncond is None else self.head.logits(z_uncond[masked])
        drawn = self.head.sample_logits(logits, p, gens, u_logits)  # [b·n_masked, 1]
        positions = masked.nonzero()[:, 1].view(b, n_masked)
        if n_reveal == n_masked:
            keep = torch.ones(b, n_masked, dtype=torch.bool, device=codes.device)
        else:
            guided = logits if u_logits is None else u_logits + params.guidance_scale * (logits - u_logits)
            logp = guided.log_softmax(-1).gather(-1, drawn[..., None])[..., 0].sum(-1).view(b, n_masked)
            temp = self.remask_temperature * (1.0 - (step + 1) / len(schedule))
            u = row_rand(generator, b, n_masked, codes.device).clamp(1e-20, 1 - 1e-7)
            score = logp + temp * -torch.log(-torch.log(u))
            best = score.argsort(dim=1, descending=True, stable=True)[:, :n_reveal]
            keep = torch.zeros(b, n_masked, dtype=torch.bool, device=codes.device).scatter_(1, best, True)
        reveal = torch.zeros_like(masked).scatter_(1, positions, keep)
        codes = codes.masked_scatter(reveal, drawn.view(b, n_masked)[keep])
        return BlockState(codes, masked & ~reveal, schedule)

    def result(self, state: BlockState) -> Tensor:
        """``[b, K, 1]`` codes."""
        return state.values[..., None]


def _token_generators(generator, per_row: int):
    """Each of ``B`` generators repeated for the ``per_row`` tokens of its image (one generator passes through)."""
    return repeat_rows(SamplingParams(), generator, per_row)[1]


class GaussianProcess:
    """The diffusion-loss head's chain inside each block: training draws one timestep ``t ~ U{0..T−1}`` per (row,
    block) for ``head.add_noise``; sampling runs the respaced chain of ``S`` steps with
    ``head.denoise_step`` (every token of a block at the same step). The backbone sees the level ``(t + 1)/T``."""

    def __init__(self, head):
        self.head = head
        self.num_train_steps = head.num_train_steps

    def noise(self, x0: Tensor, block_size: int, generator) -> tuple[Tensor, Tensor, dict]:
        """``x0: [B, L, D]`` → ``x_t [B, L, D]``, level ``[B, L]`` and what :meth:`loss` needs."""
        b, length, d = x0.shape
        t = self.head.randint(self.num_train_steps, (b, length // block_size), generator, like=x0)
        t = t.repeat_interleave(block_size, 1)
        noise = self.head.randn((b, length, d), generator, like=x0)
        x_t = self.head.add_noise(x0.flatten(0, 1), t.flatten(), noise.flatten(0, 1)).view(b, length, d)
        return x_t, (t + 1).to(x0.dtype) / self.num_train_steps, {"t": t, "noise": noise}

    def loss(self, z: Tensor, x0: Tensor, info: dict) -> Tensor:
        out = self.head.training_losses(z.flatten(0, 1), x0.flatten(0, 1), info["t"].flatten(),
                                        info["noise"].flatten(0, 1))
        return out["loss"].mean()

    def start(self, rows: int, block_size: int, num_steps: int, generator, like: Tensor) -> BlockState:
        chain = self.head.chain(num_steps)
        x = self.head.randn((rows * block_size, self.head.dim), _token_generators(generator, block_size), like=like)
        return BlockState(x.view(rows, block_size, -1), None, chain)

    def noisy_input(self, state: BlockState, step: int) -> tuple[Tensor, float]:
        chain = state.extra
        j = chain.num_steps - 1 - step
        return state.values, (int(chain.timestep_map[j]) + 1) / self.num_train_steps

    def step(self, state: BlockState, z: Tensor, z_uncond: Tensor | None, params: SamplingParams, step: int,
             generator) -> BlockState:
        """One ancestral step of every token of the block; ``z``, ``z_uncond``: ``[b, K, C]``."""
        chain, (b, k, _) = state.extra, state.values.shape
        j = torch.full((b * k,), chain.num_steps - 1 - step, dtype=torch.long, device=z.device)
        x = self.head.denoise_step(state.values.flatten(0, 1), j, z.flatten(0, 1), chain,
                                   generator=_token_generators(generator, k),
                                   z_uncond=None if z_uncond is None else z_uncond.flatten(0, 1),
                                   guidance_scale=params.guidance_scale)
        return BlockState(x.view(b, k, -1), None, chain)

    def result(self, state: BlockState) -> Tensor:
        """``[b, K, D]`` tokens."""
        return state.values


class FlowProcess:
    """The flow head's rectified flow inside each block: training draws one ``t ~ U(0, 1)`` per (row, block) for
    ``head.add_noise``; sampling integrates from ``t = 1`` to ``0`` on ``linspace(1, 0, S + 1)`` with
    ``head.denoise_step`` (the head's solver). The backbone sees the level ``t``."""

    def __init__(self, head):
        self.head = head

    def noise(self, x0: Tensor, block_size: int, generator) -> tuple[Tensor, Tensor, dict]:
        b, length, d = x0.shape
        t = self.head.rand((b, length // block_size), generator, like=x0).repeat_interleave(block_size, 1)
        noise = self.head.randn((b, length, d), generator, like=x0)
        x_t = self.head.add_noise(x0.flatten(0, 1), t.flatten(), noise.flatten(0, 1)).view(b, length, d)
        return x_t, t, {"t": t, "noise": noise}

    def loss(self, z: Tensor, x0: Tensor, info: dict) -> Tensor:
        out = self.head.training_losses(z.flatten(0, 1), x0.flatten(0, 1), info["t"].flatten(),
                                        info["noise"].flatten(0, 1))
        return out["loss"].mean()

    def start(self, rows: int, block_size: int, num_steps: int, generator, like: Tensor) -> BlockState:
        x = self.head.randn((rows * block_size, self.head.dim), _token_generators(generator, block_size), like=like)
        times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64).tolist()
        return BlockState(self.head.noise_temperature * x.view(rows, block_size, -1), None, times)

    def noisy_input(self, state: BlockState, step: int) -> tuple[Tensor, float]:
        return state.values, state.extra[step]

    def step(self, state: BlockState, z: Tensor, z_uncond: Tensor | None, params: SamplingParams, step: int,
             generator) -> BlockState:
        """One solver step of every token of the block from ``t_s`` to ``t_{s+1}``; ``z``: ``[b, K, C]``."""
        times, (b, k, _) = state.extra, state.values.shape
        x = self.head.denoise_step(state.values.flatten(0, 1), times[step], times[step + 1], z.flatten(0, 1),
                                   generator=_token_generators(generator, k),  # used by the "sde" solver
                                   z_uncond=None if z_uncond is None else z_uncond.flatten(0, 1),
                                   guidance_scale=params.guidance_scale)
        return BlockState(x.view(b, k, -1), None, times)

    def result(self, state: BlockState) -> Tensor:
        """``[b, K, D]`` tokens."""
        return state.values


def check_fraction(name: str, value, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


__all__ = ["CLEAN", "NOISY", "PREFIX", "REVEALS", "WEIGHTINGS", "BlockState", "FlowProcess", "GaussianProcess",
           "Layout", "LevelEmbedding", "MaskedProcess", "cat_layouts", "check_block_size", "check_fraction",
           "check_masked_steps", "masked_after_steps", "prefix_layout", "skip_causal_mask", "token_layout",
           "training_layout"]
