"""MAR's small denoising MLP (``SimpleMLPAdaLN``): residual blocks modulated by adaLN on (z + t embedding).

Written here rather than taken from a library because a converter must load MAR's ``diffloss.net.*``
weights into it: the layer order, norms (LayerNorm eps 1e-6, affine in the blocks, plain in the final
layer), the cosine-first sinusoidal timestep features (diffusers' ``get_timestep_embedding`` with
``flip_sin_to_cos=True, downscale_freq_shift=0`` computes MAR's exactly) and every parameter shape follow
MAR. The timestep MLP is diffusers' ``TimestepEmbedding``. :data:`MAR_KEY_MAP` / :func:`from_mar_state_dict`
rename MAR's keys to ours.

Per row (shapes ``x: [N, in]``, ``t: [N]`` float timesteps, ``c: [N, cond]``)::

    y = time_embed(sinusoid_256(t)) + cond_embed(c)                 # [N, W]
    h = input_proj(x)                                               # [N, W]
    for block:  shift, scale, gate = block.modulation(silu(y)).chunk(3)
                h = h + gate * fc2(silu(fc1(LN(h) * (1 + scale) + shift)))
    shift, scale = final.modulation(silu(y)).chunk(2)
    out = final.proj(LN_noaffine(h) * (1 + scale) + shift)          # [N, out]
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from torch import Tensor, nn

FREQUENCY_CHANNELS = 256
NORM_EPS = 1e-6


class AdaLNResBlock(nn.Module):
    """``h + gate · MLP(LN(h) · (1 + scale) + shift)`` with (shift, scale, gate) from the condition ``y``."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=NORM_EPS)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.modulation = nn.Linear(width, 3 * width)

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(F.silu(y)).chunk(3, dim=-1)
        u = self.norm(h) * (1 + scale) + shift
        return h + gate * self.fc2(F.silu(self.fc1(u)))


class AdaLNFinalLayer(nn.Module):
    """``proj(LN(h) · (1 + scale) + shift)``, LN without affine parameters."""

    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=NORM_EPS, elementwise_affine=False)
        self.modulation = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, out_channels)

    def forward(self, h: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.modulation(F.silu(y)).chunk(2, dim=-1)
        return self.proj(self.norm(h) * (1 + scale) + shift)


class AdaLNMLPDenoiser(nn.Module):
    """The denoising MLP shared by the diffusion and flow heads.

    Args:
        in_channels: channels of the noisy token ``x`` (token dim ``D``).
        width: hidden width ``W`` (MAR's ``diffloss_w``).
        out_channels: output channels (``2D`` for MAR's eps + variance, ``D`` for a velocity).
        cond_channels: channels of the backbone's ``z`` (``C``).
        depth: residual blocks (MAR's ``diffloss_d``).
    """

    def __init__(self, in_channels: int, width: int, out_channels: int, cond_channels: int, depth: int):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("width", width), ("out_channels", out_channels),
                            ("cond_channels", cond_channels), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.cond_channels = cond_channels
        self.time_embed = TimestepEmbedding(FREQUENCY_CHANNELS, width)
        self.cond_embed = nn.Linear(cond_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final = AdaLNFinalLayer(width, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """MAR's initialisation: xavier-uniform linears with zero bias, N(0, 0.02²) timestep MLP, and zero
        modulations and output projection (each block starts as the identity, the output at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        for lin in [b.modulation for b in self.blocks] + [self.final.modulation, self.final.proj]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """``x: [N, in]``, ``t: [N]`` (float or int timesteps on the model's scale), ``c: [N, cond]`` → ``[N, out]``."""
        freqs = get_timestep_embedding(t, FREQUENCY_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        y = self.time_embed(freqs.to(x.dtype)) + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, y)
        return self.final(h, y)


#: MAR ``SimpleMLPAdaLN`` key (regex, after stripping ``diffloss.net.``) → our key.
MAR_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^time_embed\.mlp\.0\.", "time_embed.linear_1."),
    (r"^time_embed\.mlp\.2\.", "time_embed.linear_2."),
    (r"^cond_embed\.", "cond_embed."),
    (r"^input_proj\.", "input_proj."),
    (r"^res_blocks\.(\d+)\.in_ln\.", r"blocks.\1.norm."),
    (r"^res_blocks\.(\d+)\.mlp\.0\.", r"blocks.\1.fc1."),
    (r"^res_blocks\.(\d+)\.mlp\.2\.", r"blocks.\1.fc2."),
    (r"^res_blocks\.(\d+)\.adaLN_modulation\.1\.", r"blocks.\1.modulation."),
    (r"^final_layer\.adaLN_modulation\.1\.", "final.modulation."),
    (r"^final_layer\.linear\.", "final.proj."),
)


def from_mar_state_dict(state_dict: dict[str, Tensor], prefix: str = "diffloss.net.") -> dict[str, Tensor]:
    """The entries of a MAR state_dict under ``prefix``, renamed for :class:`AdaLNMLPDenoiser`.

    Raises ``ValueError`` naming any key under ``prefix`` that has no counterpart here.
    """
    out, unknown = {}, []
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for pattern, repl in MAR_KEY_MAP:
            new, n = re.subn(pattern, repl, rest)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"MAR keys with no AdaLNMLPDenoiser counterpart: {unknown}")
    if not out:
        raise ValueError(f"no keys under prefix {prefix!r} in the state_dict")
    return out
