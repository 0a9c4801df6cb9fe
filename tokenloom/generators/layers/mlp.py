"""Feed-forward blocks: SwiGLU (Llama/LlamaGen) and GELU MLP (ViT/VAR/MAR), built by one factory.

SwiGLU is our own so that its parameters carry LlamaGen's names (``w1``, ``w3``, ``w2``) and its
hidden size follows LlamaGen's formula; the GELU MLP is timm's ``Mlp`` (keys ``fc1``, ``fc2``).
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

MLPS = ("swiglu", "gelu", "gelu_tanh")


def round_up(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is ``>= n``."""
    return n if n % k == 0 else n + k - n % k


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's FFN width: ``round_up(int(2·4·dim/3) [· multiplier, truncated], multiple_of)``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return round_up(hidden, multiple_of)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) · w3 x)``. Shapes: ``x: [..., C] -> [..., C]``."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def make_mlp(
    kind: str,
    dim: int,
    *,
    multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    mlp_ratio: float = 4.0,
    bias: bool | None = None,
) -> nn.Module:
    """Build a feed-forward block.

    Args:
        kind: ``"swiglu"`` (hidden from :func:`swiglu_hidden_dim`, no bias by default),
            ``"gelu"`` (exact GELU) or ``"gelu_tanh"`` (tanh-approximate GELU); GELU hidden size is
            ``int(dim · mlp_ratio)``, bias by default.
        dim: model width ``C``.
    """
    if kind == "swiglu":
        return SwiGLU(dim, swiglu_hidden_dim(dim, multiple_of, ffn_dim_multiplier), bias=bool(bias))
    if kind in ("gelu", "gelu_tanh"):
        act = partial(nn.GELU, approximate="tanh" if kind == "gelu_tanh" else "none")
        return Mlp(dim, int(dim * mlp_ratio), act_layer=act, bias=True if bias is None else bias)
    raise ValueError(f"mlp must be one of {MLPS}, got {kind!r}")
