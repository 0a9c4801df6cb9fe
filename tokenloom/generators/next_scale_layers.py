"""The next-scale transformer's layers: VAR's attention (optional l2-normalised q/k) and its adaLN block.

* :class:`ScaleAttention` — VAR's ``SelfAttention``: one ``mat_qkv`` projection without bias plus separate
  ``q_bias``/``v_bias`` (k has none), features laid out as ``(3, H, head_dim)``. With ``l2_norm`` (VAR's
  ``attn_l2_norm``), q and k are L2-normalised over ``head_dim``, q is multiplied per head by
  ``exp(min(scale_mul_h, ln 100))`` (``scale_mul_1H11`` is learned; ln 100 as float32) and the softmax has
  no ``1/sqrt(head_dim)`` factor. Without it the logit scale is ``attn_scale`` (VAR: ``0.25/sqrt(head_dim)``).
  Attention runs through ``scaled_dot_product_attention`` with explicit boolean masks.
* :class:`AdaLNScaleBlock` — VAR's ``AdaLNSelfAttn``: with ``(gamma1, gamma2, scale1, scale2, shift1, shift2)``
  from the condition, ``x += gamma1 · attn(LN(x)·(1+scale1)+shift1)``; ``x += gamma2 · ffn(LN(x)·(1+scale2)+shift2)``
  where LN has no affine parameters and the FFN is ``fc2(GELU_tanh(fc1 x))``. The modulation comes from the
  block's own ``ada_lin`` (``SiLU → Linear``) or, with ``shared_adaln``, from one model-wide modulation plus the
  block's learned offset ``ada_gss``.

Own code (not timm's ``Attention``) because checkpoint parity fixes the parameter names, the missing k bias and
the clamped per-head scale; key names follow VAR so its checkpoints map one to one.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from tokenloom.generators.layers.adaln import AdaLNModulation, modulate
from tokenloom.generators.layers.kv_cache import LayerKV

MAX_SCALE_MUL = torch.log(torch.tensor(100.0)).item()  # ln(100) evaluated in float32 = 4.605170249938965


class ScaleAttention(nn.Module):
    """Self-attention over ``x: [B, T, C]``; see the module docstring.

    Args:
        dim: width ``C``; ``head_dim = C / num_heads``.
        num_heads: ``H``.
        l2_norm: VAR's ``attn_l2_norm``.
        attn_scale: logit scale without ``l2_norm``; None = ``1/sqrt(head_dim)``.
        qkv_bias: learned ``q_bias`` and ``v_bias`` (k never has a bias).
    """

    def __init__(self, dim: int, num_heads: int, *, l2_norm: bool = True, attn_scale: float | None = None,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width must be divisible by num_heads, got width={dim}, num_heads={num_heads}")
        self.num_heads, self.head_dim, self.l2_norm = num_heads, dim // num_heads, l2_norm
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
            self.scale = 1.0
        else:
            self.scale = 1.0 / math.sqrt(self.head_dim) if attn_scale is None else float(attn_scale)
        self.proj = nn.Linear(dim, dim)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x: [B, T, C]`` → q, k, v ``[B, H, T, head_dim]`` (q and k normalised and q scaled with ``l2_norm``)."""
        b, t, c = x.shape
        bias = None
        if hasattr(self, "q_bias"):
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp())
            k = F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, x: Tensor, mask: Tensor | None = None, kv: LayerKV | None = None) -> Tensor:
        """Attend ``x: [B, T, C]`` → ``[B, T, C]``.

        Args:
            mask: bool, broadcastable to ``[B, H, T, T_k]`` (True = may attend); None = every key.
            kv: this layer's cache view; the ``T`` new keys/values are appended and attention runs over all cached
                positions (``T_k`` = cached + T).
        """
        q, k, v = self.qkv(x)
        if kv is not None:
            k, v = kv.update(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).flatten(2))


class AdaLNScaleBlock(nn.Module):
    """One adaLN transformer block over ``x: [B, T, C]``; see the module docstring.

    Args:
        width: ``C``; ``num_heads``: ``H``; ``cond_dim``: width ``D`` of the condition vector.
        mlp_ratio: FFN hidden = ``round(C · mlp_ratio)`` (VAR).
        norm_eps: LayerNorm epsilon (VAR: 1e-6).
        shared_adaln: take the modulation from the model (plus ``ada_gss``) instead of an own ``ada_lin``.
        l2_norm, attn_scale, qkv_bias: see :class:`ScaleAttention`.
        drop_path: stochastic depth probability (training only).
    """

    def __init__(self, width: int, num_heads: int, cond_dim: int, *, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 shared_adaln: bool = False, l2_norm: bool = True, attn_scale: float | None = None,
                 qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.width, self.shared_adaln = width, shared_adaln
        self.attn = ScaleAttention(width, num_heads, l2_norm=l2_norm, attn_scale=attn_scale, qkv_bias=qkv_bias)
        self.ffn = Mlp(width, round(width * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.norm = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if shared_adaln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        else:
            self.ada_lin = AdaLNModulation(cond_dim, width, 6)

    def modulation(self, cond: Tensor) -> Tensor:
        """``[B, 1, 6, C]`` from ``cond``: ``[B, D]`` (own ``ada_lin``) or ``[B, 1, 6, C]`` (shared)."""
        if self.shared_adaln:
            return self.ada_gss + cond
        return self.ada_lin(cond)

    def forward(self, x: Tensor, ada: Tensor, mask: Tensor | None = None, kv: LayerKV | None = None) -> Tensor:
        """``x: [B, T, C]``, ``ada: [B, 1, 6, C]`` from :meth:`modulation`; ``mask``, ``kv`` as in attention."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        x = x + self.drop_path(self.attn(modulate(self.norm(x), scale1, shift1), mask, kv).mul_(gamma1))
        return x + self.drop_path(self.ffn(modulate(self.norm(x), scale2, shift2)).mul(gamma2))
