"""The two decoders of the FlexTok-style 1D tokenizer: image patches from any prefix of register tokens.

Both read ``registers: [B, K, D]`` (the first ``K <= N`` token embeddings, already projected to the width ``D``
and carrying their position embedding) plus an optional ``key_mask: [B, K]`` bool (False = a register dropped by
nested dropout: no query may attend to it). Feeding the first ``k`` registers, or all ``K`` of them with
``key_mask[:, k:] = False``, gives the same patches up to float round-off: that is how training masks per
sample and inference truncates. Patches come out as ``[B, P, patch_dim]`` in the tokenizer's patch order.

* :class:`RegressionDecoder`: learned patch queries (one per patch position) and the registers go through timm
  ViT blocks (``timm.models.vision_transformer.Block``) with full attention; a linear head maps each patch
  query to its pixels. Trained with a pixel loss, it predicts the conditional mean image given the prefix.
* :class:`FlowDecoder` (FlexTok's choice): a rectified-flow transformer. Noisy patches
  ``x_t = (1 - t)·x + t·ε`` (``t`` in ``[0, 1]``, ``ε ~ N(0, I)``) and the registers go through DiT-style
  blocks (timm's ``Attention`` and ``Mlp`` with adaLN-zero modulation by the time embedding); the head predicts
  the velocity ``v = ε - x``. :meth:`FlowDecoder.sample` integrates from ``t = 1`` (pure noise) to ``t = 0``
  with ``num_steps`` uniform Euler steps. One step returns ``ε - v(ε, 1)``, the decoder's estimate of the
  conditional mean; more steps draw a sharper sample from ``p(x | prefix)``.

Why our own adaLN block: timm's ``Block`` has no conditioning input; the block reuses timm's attention and
MLP modules and adds only the modulation (DiT's adaLN-zero).
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

TIME_FEATURES = 256


def key_mask_bias(key_mask: Tensor | None, num_fixed: int, dtype: torch.dtype) -> Tensor | None:
    """``key_mask: [B, K]`` bool (False = hidden) → additive attention bias ``[B, 1, 1, num_fixed + K]`` where the
    first ``num_fixed`` keys (the patches) are always visible; None → None."""
    if key_mask is None:
        return None
    visible = torch.cat([key_mask.new_ones(key_mask.shape[0], num_fixed), key_mask], dim=1)
    bias = torch.zeros(visible.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill(~visible, float("-inf"))[:, None, None, :]


def frequency_basis(grid: int, num: int) -> Tensor:
    """``[num, grid²]``: the orthonormal 2D DCT-II basis of a ``grid × grid`` patch grid (patches row-major), rows in
    zig-zag frequency order (by ``u + v``, then ``u``), as JPEG orders coefficients: row 0 is the mean, later
    rows are finer detail. Rows beyond ``grid²`` are zero."""
    pos = torch.arange(grid, dtype=torch.float64)
    freq = torch.arange(grid, dtype=torch.float64)
    basis_1d = torch.cos(math.pi * (2 * pos[None, :] + 1) * freq[:, None] / (2 * grid))  # [u, x]
    basis_1d[0] *= math.sqrt(1 / grid)
    basis_1d[1:] *= math.sqrt(2 / grid)
    order = sorted(((u, v) for u in range(grid) for v in range(grid)), key=lambda uv: (uv[0] + uv[1], uv[0]))
    rows = [torch.outer(basis_1d[u], basis_1d[v]).flatten() for u, v in order[:num]]
    out = torch.zeros(num, grid * grid, dtype=torch.float64)
    out[: len(rows)] = torch.stack(rows)
    return out.float()


def mix_registers(weight: Tensor, registers: Tensor, key_mask: Tensor | None) -> Tensor:
    """``weight: [P, N]``, ``registers: [B, K, D]`` → ``[B, P, D]``: each patch's learned linear mixture of the
    first ``K`` registers, hidden ones (``key_mask`` False) left out."""
    if key_mask is not None:
        registers = registers * key_mask[..., None].to(registers.dtype)
    return torch.einsum("pk,bkd->bpd", weight[:, : registers.shape[1]], registers)


def timestep_features(t: Tensor, dim: int = TIME_FEATURES, max_period: float = 10000.0) -> Tensor:
    """``t: [B]`` in ``[0, 1]`` → ``[B, dim]`` sinusoidal features of ``1000·t`` (cosines first, DiT's layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block modulated by a condition ``c: [B, D]`` (DiT's adaLN-zero):
    ``x += gate1 · attn(LN(x)·(1+scale1)+shift1)``, ``x += gate2 · mlp(LN(x)·(1+scale2)+shift2)``; ``x: [B, S, D]``.
    The modulation is zero-initialised, so a fresh block is the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1), attn_mask=attn_mask)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class RegressionDecoder(nn.Module):
    """Registers ``[B, K, D]`` → patches ``[B, P, patch_dim]`` (one deterministic image per prefix).

    Args:
        num_patches: ``P``; width: ``D``; depth: timm blocks; num_heads, mlp_ratio: their sizes;
        patch_dim: pixels per patch (``3·p·p``).
    """

    def __init__(self, num_patches: int, num_registers: int, width: int, depth: int, num_heads: int, mlp_ratio: float,
                 patch_dim: int):
        super().__init__()
        self.num_patches = num_patches
        self.patch_queries = nn.Parameter(torch.zeros(1, num_patches, width))
        self.register_to_patch = nn.Parameter(frequency_basis(math.isqrt(num_patches), num_registers).T.contiguous())
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, patch_dim)
        nn.init.trunc_normal_(self.patch_queries, std=0.02)
        nn.init.zeros_(self.head.weight)  # start from a blank image: no random output to unlearn
        nn.init.zeros_(self.head.bias)

    def forward(self, registers: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``registers: [B, K, D]``, ``key_mask: [B, K]`` bool or None → ``[B, P, patch_dim]``."""
        queries = self.patch_queries + mix_registers(self.register_to_patch, registers, key_mask)
        x = torch.cat([queries, registers], dim=1)
        bias = key_mask_bias(key_mask, self.num_patches, x.dtype)
        for block in self.blocks:
            x = block(x, attn_mask=bias)
        return self.head(self.norm(x[:, : self.num_patches]))


class FlowDecoder(nn.Module):
    """Rectified-flow velocity model: ``(x_t [B, P, patch_dim], t [B], registers [B, K, D])`` → ``v [B, P,
    patch_dim]``. Arguments as :class:`RegressionDecoder`."""

    def __init__(self, num_patches: int, num_registers: int, width: int, depth: int, num_heads: int, mlp_ratio: float,
                 patch_dim: int):
        super().__init__()
        self.num_patches = num_patches
        self.patch_embed = nn.Linear(patch_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, width))
        self.register_to_patch = nn.Parameter(frequency_basis(math.isqrt(num_patches), num_registers).T.contiguous())
        self.time_embed = nn.Sequential(nn.Linear(TIME_FEATURES, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(AdaLNBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, patch_dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer in (self.final_modulation[1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: Tensor, t: Tensor, registers: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Velocity ``[B, P, patch_dim]`` at noisy patches ``x_t`` and times ``t: [B]``."""
        c = self.time_embed(timestep_features(t).to(x_t.dtype))
        patches = self.patch_embed(x_t) + self.pos_embed + mix_registers(self.register_to_patch, registers, key_mask)
        x = torch.cat([patches, registers], dim=1)
        bias = key_mask_bias(key_mask, self.num_patches, x.dtype)
        for block in self.blocks:
            x = block(x, c, attn_mask=bias)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.head(_modulate(self.norm(x[:, : self.num_patches]), shift, scale))

    @torch.no_grad()
    def sample(self, registers: Tensor, patch_dim: int, num_steps: int,
               generator: torch.Generator | None = None) -> Tensor:
        """Euler integration from ``t = 1`` to ``0`` in ``num_steps`` uniform steps → patches ``[B, P, patch_dim]``.

        The starting noise is drawn with ``generator`` (same generator state → same patches)."""
        b = registers.shape[0]
        x = torch.randn(b, self.num_patches, patch_dim, generator=generator, device=registers.device,
                        dtype=registers.dtype)
        times = torch.linspace(1.0, 0.0, num_steps + 1, device=registers.device)
        for i in range(num_steps):
            t, t_next = times[i], times[i + 1]
            v = self(x, t.expand(b), registers)
            x = x + (t_next - t) * v
        return x


__all__ = ["AdaLNBlock", "FlowDecoder", "RegressionDecoder", "frequency_basis", "key_mask_bias", "mix_registers",
           "timestep_features"]
