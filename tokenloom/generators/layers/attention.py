"""Multi-head self-attention with rotary embeddings, explicit masks and an optional KV cache.

Attention itself is ``torch.nn.functional.scaled_dot_product_attention`` (scale ``1/sqrt(D)``). Parameter
names follow LlamaGen (``wqkv`` fused, or ``wq``/``wk``/``wv``; ``wo``) so its checkpoints load by name.
The fused projection's output features are ``[q (H·D) | k (H_kv·D) | v (H_kv·D)]``, heads outermost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokenloom.generators.layers.kv_cache import LayerKV
from tokenloom.generators.layers.rope import apply_rope


class Attention(nn.Module):
    """Self-attention over ``x: [B, T, C]``.

    Args:
        dim: width ``C``; ``head_dim = C / num_heads``.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``H_kv`` (grouped-query attention); None = ``H``.
        fused_qkv: one ``wqkv`` Linear instead of three.
        qkv_bias / out_bias: biases of the projections (LlamaGen: none).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, fused_qkv: bool = True,
                 qkv_bias: bool = False, out_bias: bool = False):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads={num_heads}, got {num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        q_out, kv_out = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.split_sizes = (q_out, kv_out, kv_out)
        if fused_qkv:
            self.wqkv = nn.Linear(dim, q_out + 2 * kv_out, bias=qkv_bias)
        else:
            self.wq = nn.Linear(dim, q_out, bias=qkv_bias)
            self.wk = nn.Linear(dim, kv_out, bias=qkv_bias)
            self.wv = nn.Linear(dim, kv_out, bias=qkv_bias)
        self.wo = nn.Linear(q_out, dim, bias=out_bias)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x: [B, T, C]`` → q ``[B, T, H, D]``, k and v ``[B, T, H_kv, D]``."""
        if hasattr(self, "wqkv"):
            q, k, v = self.wqkv(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        b, t, _ = x.shape
        return (q.view(b, t, self.num_heads, self.head_dim), k.view(b, t, self.num_kv_heads, self.head_dim),
                v.view(b, t, self.num_kv_heads, self.head_dim))

    def forward(self, x: Tensor, rope: Tensor | None = None, mask: Tensor | None = None,
                kv: LayerKV | None = None) -> Tensor:
        """Attend ``x: [B, T, C]`` → ``[B, T, C]``.

        Args:
            rope: ``[T, D/2, 2]`` rotary table rows of these ``T`` positions (None: no rotation).
            mask: bool, broadcastable to ``[B, H, T, T_k]`` (True = may attend); None = attend to every key.
            kv: this layer's cache view; keys/values of the ``T`` new positions are appended and attention runs
                over all cached positions (``T_k`` = cached + T).
        """
        q, k, v = self.qkv(x)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is not None:
            k, v = kv.update(k, v)
        gqa = self.num_kv_heads != self.num_heads
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # CPU SDPA in reduced precision is slow (its bf16 backward ~5x the float32 one, measured): the
            # projections keep autocast's bf16 (AMX), the attention itself runs in float32.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                     enable_gqa=gqa).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).flatten(2))
