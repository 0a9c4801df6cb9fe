"""The Llama pre-norm transformer block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``.

Sub-module names follow LlamaGen (``attention_norm``, ``attention``, ``ffn_norm``, ``feed_forward``).
adaLN (a later issue) slots in by modulating the two branches: ``_attn_branch``/``_ffn_branch`` take the
normalised input, so a conditioned block only needs a modulation module and its own ``forward``.
"""

from __future__ import annotations

from torch import Tensor, nn

from tokenloom.generators.layers.attention import Attention
from tokenloom.generators.layers.kv_cache import LayerKV
from tokenloom.generators.layers.mlp import make_mlp
from tokenloom.generators.layers.norms import make_norm


class TransformerBlock(nn.Module):
    """One pre-norm block over ``x: [B, T, C]``.

    Args:
        dim, num_heads, num_kv_heads, fused_qkv, qkv_bias: see :class:`Attention`.
        mlp: ``"swiglu"``, ``"gelu"`` or ``"gelu_tanh"`` (see :func:`make_mlp`), with ``multiple_of``,
            ``ffn_dim_multiplier`` (SwiGLU) and ``mlp_ratio`` (GELU).
        norm: ``"rms"`` or ``"layer"``; ``norm_eps`` its epsilon.
        dropout: dropout on each branch's output before the residual add (LlamaGen's ``resid_dropout_p`` and
            ``ffn_dropout_p``); active in training mode only.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, *, mlp: str = "swiglu",
                 multiple_of: int = 256, ffn_dim_multiplier: float | None = None, mlp_ratio: float = 4.0,
                 norm: str = "rms", norm_eps: float = 1e-5, fused_qkv: bool = True, qkv_bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        self.attention_norm = make_norm(norm, dim, norm_eps)
        self.attention = Attention(dim, num_heads, num_kv_heads, fused_qkv=fused_qkv, qkv_bias=qkv_bias)
        self.ffn_norm = make_norm(norm, dim, norm_eps)
        self.feed_forward = make_mlp(mlp, dim, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier,
                                     mlp_ratio=mlp_ratio)
        self.dropout = nn.Dropout(dropout)

    def _attn_branch(self, h: Tensor, rope: Tensor | None, mask: Tensor | None, kv: LayerKV | None) -> Tensor:
        return self.dropout(self.attention(h, rope, mask, kv))

    def _ffn_branch(self, h: Tensor) -> Tensor:
        return self.dropout(self.feed_forward(h))

    def forward(self, x: Tensor, rope: Tensor | None = None, mask: Tensor | None = None,
                kv: LayerKV | None = None) -> Tensor:
        """``x: [B, T, C]`` → ``[B, T, C]``; ``rope``, ``mask`` and ``kv`` as in :meth:`Attention.forward`."""
        h = x + self._attn_branch(self.attention_norm(x), rope, mask, kv)
        return h + self._ffn_branch(self.ffn_norm(h))
