"""The taming/LDM convolutional encoder and decoder shared by LlamaGen's VQModel, VAR's VQVAE and MAR's KL-VAE.

Why our own: the public checkpoints of those three projects must load into one module tree, and their small
differences are options here, not copies (fixtures README §1):

=====================  ==================  ==================  ===================================
option                 LlamaGen            VAR                 MAR
=====================  ==================  ==================  ===================================
``attn_levels``        last level          last level          levels whose resolution is listed
``decoder attn``       last level          last level          none (``attn_levels=()``)
``mid_attn``           True                True (using_mid_sa)  True
``fused_qkv``          False (q, k, v)     True (qkv)          False
``double_z``           False               False               True (mean and log-variance)
=====================  ==================  ==================  ===================================

Module names follow VAR/MAR (converters map other layouts onto them)::

    encoder.conv_in, encoder.down.{i}.block.{k}, encoder.down.{i}.attn.{k}, encoder.down.{i}.downsample.conv,
    encoder.mid.block_1, encoder.mid.attn_1, encoder.mid.block_2, encoder.norm_out, encoder.conv_out
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.block.{k}, decoder.up.{i}.attn.{k},
    decoder.up.{i}.upsample.conv, decoder.norm_out, decoder.conv_out

Level ``i`` (0 = full resolution) has width ``ch * ch_mult[i]``; the downsampling factor is
``2 ** (len(ch_mult) - 1)``. Every GroupNorm has ``norm_groups`` groups (32 in all public checkpoints) and
eps 1e-6, so every width must be a multiple of ``norm_groups``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

NORM_EPS = 1e-6


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """``x: [B, Ci, H, W]`` → ``[B, Co, H, W]``: ``skip(x) + conv2(swish(norm2(conv1(swish(norm1(x))))))``.

    The skip is a 1×1 conv ``nin_shortcut`` when ``Ci != Co``, else the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all ``H*W`` positions (row-major): ``x + proj_out(attn(norm(x)))``.

    ``x: [B, C, H, W]``. q, k, v are 1×1 convs, either separate (``q``, ``k``, ``v``) or one ``qkv`` conv
    with ``3C`` outputs ordered q, k, v; scores are scaled by ``C ** -0.5``.
    """

    def __init__(self, channels: int, fused_qkv: bool = False, norm_groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, norm_groups)
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        else:
            self.q = nn.Conv2d(channels, channels, 1)
            self.k = nn.Conv2d(channels, channels, 1)
            self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        if self.fused_qkv:
            q, k, v = self.qkv(n).chunk(3, dim=1)
        else:
            q, k, v = self.q(n), self.k(n), self.v(n)
        # [B, C, H, W] -> [B, 1, HW, C]: one head whose dim is C, so SDPA's default scale is C ** -0.5.
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """``[B, C, H, W]`` → ``[B, C, H/2, W/2]``: pad right and bottom by one zero, 3×3 conv, stride 2, no padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """``[B, C, H, W]`` → ``[B, C, 2H, 2W]``: nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """Residual block, attention block (or identity), residual block, all at one width."""

    def __init__(self, channels: int, attn: bool, fused_qkv: bool, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1 = AttnBlock(channels, fused_qkv, norm_groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block.{k}`` residual blocks, each followed by ``attn.{k}`` if the level has
    attention, then an optional resampler (``downsample`` in the encoder, ``upsample`` in the decoder)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attn: bool, fused_qkv: bool,
                 norm_groups: int, resample: str | None):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_blocks
        self.block = nn.ModuleList(ResnetBlock(widths[k], widths[k + 1], norm_groups) for k in range(num_blocks))
        self.attn = nn.ModuleList(
            AttnBlock(out_channels, fused_qkv, norm_groups) for _ in range(num_blocks if attn else 0)
        )
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def forward(self, x: Tensor) -> Tensor:
        for k, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[k](x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


def _check_sizes(ch: int, ch_mult: Sequence[int], num_res_blocks: int, norm_groups: int,
                 attn_levels: Sequence[int]) -> None:
    if isinstance(ch, bool) or not isinstance(ch, int) or ch < 1:
        raise ValueError(f"ch must be a positive int, got {ch!r}")
    if len(ch_mult) == 0 or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {list(ch_mult)!r}")
    if isinstance(num_res_blocks, bool) or not isinstance(num_res_blocks, int) or num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be a positive int, got {num_res_blocks!r}")
    if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
        raise ValueError(f"norm_groups must be a positive int, got {norm_groups!r}")
    widths = [ch] + [ch * m for m in ch_mult]
    bad = sorted({w for w in widths if w % norm_groups})
    if bad:
        raise ValueError(f"every width (ch={ch} times 1 and each of ch_mult={list(ch_mult)}) must be a multiple of "
                         f"norm_groups={norm_groups}; these are not: {bad}")
    levels = len(ch_mult)
    wrong = [i for i in attn_levels if not 0 <= i < levels]
    if wrong:
        raise ValueError(f"attn_levels must index levels 0..{levels - 1}, got {list(attn_levels)!r}")


def _attn_levels(attn_levels: Sequence[int] | None, levels: int) -> tuple[int, ...]:
    return (levels - 1,) if attn_levels is None else tuple(int(i) for i in attn_levels)


class Encoder(nn.Module):
    """``images: [B, in_channels, H, W]`` → ``[B, z_channels (×2 if double_z), H/f, W/f]``, ``f = 2**(n-1)``.

    Args:
        in_channels: image channels.
        ch: base width; level ``i`` has width ``ch * ch_mult[i]``.
        ch_mult: width multipliers, one per level (``n = len(ch_mult)`` levels).
        num_res_blocks: residual blocks per level.
        z_channels: latent channels (doubled when ``double_z``: mean and log-variance of a KL-VAE).
        attn_levels: levels with an attention block after each residual block; None = the last level only.
        mid_attn: attention between the two middle residual blocks.
        fused_qkv: one ``qkv`` conv (VAR) instead of ``q``, ``k``, ``v`` (LlamaGen, MAR).
        norm_groups: GroupNorm groups (32 for public checkpoints; fewer lets tiny models be narrow).
    """

    def __init__(self, in_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, double_z: bool = False,
                 attn_levels: Sequence[int] | None = None, mid_attn: bool = True, fused_qkv: bool = False,
                 norm_groups: int = 32):
        super().__init__()
        levels = len(ch_mult)
        attn = _attn_levels(attn_levels, levels)
        _check_sizes(ch, ch_mult, num_res_blocks, norm_groups, attn)
        self.downsample_factor = 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_widths = [ch] + [ch * m for m in ch_mult[:-1]]
        self.down = nn.ModuleList(
            Level(in_widths[i], ch * ch_mult[i], num_res_blocks, i in attn, fused_qkv, norm_groups,
                  "down" if i != levels - 1 else None)
            for i in range(levels)
        )
        width = ch * ch_mult[-1]
        self.mid = MidBlock(width, mid_attn, fused_qkv, norm_groups)
        self.norm_out = _norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``z: [B, z_channels, h, w]`` → ``[B, out_channels, h*f, w*f]`` (not clamped), ``f = 2**(n-1)``.

    Level ``i`` (``up.{i}``, 0 = full resolution) has ``num_res_blocks + 1`` residual blocks; levels run from
    ``n-1`` down to 0 with an upsample after every level but level 0. Other arguments as :class:`Encoder`
    (``attn_levels=None`` = the last level, the lowest resolution, only).
    """

    def __init__(self, out_channels: int = 3, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, z_channels: int = 256, attn_levels: Sequence[int] | None = None,
                 mid_attn: bool = True, fused_qkv: bool = False, norm_groups: int = 32):
        super().__init__()
        levels = len(ch_mult)
        attn = _attn_levels(attn_levels, levels)
        _check_sizes(ch, ch_mult, num_res_blocks, norm_groups, attn)
        self.upsample_factor = 2 ** (levels - 1)
        width = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, mid_attn, fused_qkv, norm_groups)
        # up[i] is built in processing order (i = n-1 first), so its input width is the previous level's.
        up: list[Level | None] = [None] * levels
        for i in reversed(range(levels)):
            up[i] = Level(width, ch * ch_mult[i], num_res_blocks + 1, i in attn, fused_qkv, norm_groups,
                          "up" if i != 0 else None)
            width = ch * ch_mult[i]
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(width, norm_groups)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "MidBlock", "ResnetBlock", "Upsample"]
