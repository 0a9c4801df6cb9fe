"""Shared transformer layers: norms, MLPs, RoPE, masks, attention, KV cache, block, prefixes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenloom.generators.condition import Condition
from tokenloom.generators.layers.attention import Attention
from tokenloom.generators.layers.block import TransformerBlock
from tokenloom.generators.layers.kv_cache import KVCache
from tokenloom.generators.layers.masks import block_causal_mask, causal_mask, prefix_mask, with_key_padding
from tokenloom.generators.layers.mlp import SwiGLU, make_mlp, swiglu_hidden_dim
from tokenloom.generators.layers.norms import RMSNorm, make_norm
from tokenloom.generators.layers.prefix import ClassPrefix, StartPrefix, TextPrefix, cat_prefixes, make_prefix
from tokenloom.generators.layers.rope import apply_rope, rope_table_1d, rope_table_2d

FIXTURE = Path(os.environ["TOKENLOOM_FIXTURES"]) / "llamagen" / "gpt" / "io.safetensors"


def _randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))


# ------------------------------------------------------------------ norms, MLPs
def test_rmsnorm_matches_formula_and_uses_float32_statistics():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x.float()), want.float(), rtol=1e-6, atol=1e-6)
    # bf16 input: statistics in float32, cast back before the weight (LlamaGen).
    xb = (x * 100).bfloat16()
    want_b = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16() * norm.weight
    assert torch.equal(norm(xb), want_b)


def test_make_norm_kinds_and_errors():
    assert isinstance(make_norm("rms", 4, 1e-6), RMSNorm) and make_norm("rms", 4, 1e-6).eps == 1e-6
    ln = make_norm("layer", 4, 1e-6, affine=False)
    assert isinstance(ln, torch.nn.LayerNorm) and ln.weight is None
    with pytest.raises(ValueError, match="norm must be one of"):
        make_norm("batch", 4)


@pytest.mark.parametrize("dim,multiple_of,mult,want", [(64, 256, None, 256), (1024, 256, None, 2816),
                                                       (1280, 256, None, 3584), (96, 32, 1.3, 352)])
def test_swiglu_hidden_dim_llamagen_formula(dim, multiple_of, mult, want):
    # LlamaGen-L (dim 1024) has 2816 hidden; -XL (1280) has 3584; 96·8/3 = 256 · 1.3 = 332 → 352.
    assert swiglu_hidden_dim(dim, multiple_of, mult) == want


def test_swiglu_formula_and_gelu_mlp():
    mlp = make_mlp("swiglu", 16, multiple_of=8)
    assert isinstance(mlp, SwiGLU) and mlp.w1.out_features == swiglu_hidden_dim(16, 8) and mlp.w1.bias is None
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(mlp(x), mlp.w2(F.silu(mlp.w1(x)) * mlp.w3(x)))
    gelu = make_mlp("gelu_tanh", 16, mlp_ratio=2.0)
    assert gelu.fc1.out_features == 32
    torch.testing.assert_close(gelu(x), gelu.fc2(F.gelu(gelu.fc1(x), approximate="tanh")))
    with pytest.raises(ValueError, match="mlp must be one of"):
        make_mlp("relu", 16)


# ------------------------------------------------------------------ RoPE
def _rotate_reference(x: torch.Tensor, angles: list[list[float]]) -> torch.Tensor:
    """Rotate ``x: [T, D]`` pair by pair with explicit angles ``[T][D/2]`` (float64 loops)."""
    out = x.double().clone()
    for t, row in enumerate(angles):
        for j, a in enumerate(row):
            x0, x1 = float(x[t, 2 * j]), float(x[t, 2 * j + 1])
            out[t, 2 * j] = x0 * math.cos(a) - x1 * math.sin(a)
            out[t, 2 * j + 1] = x1 * math.cos(a) + x0 * math.sin(a)
    return out


@pytest.mark.parametrize("prefix", ["zero", "identity"])
def test_rope_2d_matches_per_pair_rotation(prefix):
    h, w, d, base, p = 3, 5, 8, 100.0, 2
    table = rope_table_2d(h, w, d, base, num_prefix=p, prefix=prefix)
    assert table.shape == (p + h * w, d // 2, 2) and table.dtype == torch.float32
    half = d // 2
    omega = [1.0 / base ** (2 * k / half) for k in range(half // 2)]
    angles = [[0.0] * half for _ in range(p)]
    for cell in range(h * w):
        r, c = divmod(cell, w)
        angles.append([r * o for o in omega] + [c * o for o in omega])  # rows first, then columns
    x = torch.randn(p + h * w, d)
    got = apply_rope(x[None, :, None, :], table)[0, :, 0]
    want = _rotate_reference(x, angles)
    if prefix == "zero":
        want[:p] = 0.0  # LlamaGen: cos = sin = 0 zeroes the prefix's q and k
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_rope_1d_matches_per_pair_rotation():
    length, d, base = 6, 8, 10000.0
    table = rope_table_1d(length, d, base, num_prefix=1, prefix="identity")
    omega = [1.0 / base ** (2 * j / d) for j in range(d // 2)]
    angles = [[0.0] * (d // 2)] + [[t * o for o in omega] for t in range(length)]
    x = torch.randn(length + 1, d)
    got = apply_rope(x[None, :, None, :], table)[0, :, 0]
    torch.testing.assert_close(got.double(), _rotate_reference(x, angles), rtol=0, atol=1e-5)


def test_rope_keeps_dtype_and_rejects_bad_head_dim():
    table = rope_table_2d(2, 2, 8)
    x = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert apply_rope(x, table).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="head_dim must be a positive multiple of 4"):
        rope_table_2d(2, 2, 6)
    with pytest.raises(ValueError, match="prefix rope must be one of"):
        rope_table_2d(2, 2, 8, num_prefix=1, prefix="ones")


@pytest.mark.skipif(not FIXTURE.exists(), reason="LlamaGen fixture not available")
def test_rope_2d_table_bit_exact_with_llamagen_fixture():
    from safetensors.torch import load_file

    ref = load_file(str(FIXTURE))["freqs_cis"]  # [1 + 16, 8, 2], class row all zero
    assert torch.equal(rope_table_2d(4, 4, 16, 10000, num_prefix=1, prefix="zero"), ref)


# ------------------------------------------------------------------ masks
def test_causal_mask_vs_dense_reference():
    for q, k in [(5, 5), (1, 7), (3, 7), (4, None)]:
        kk = q if k is None else k
        want = torch.tensor([[j <= kk - q + i for j in range(kk)] for i in range(q)])
        assert torch.equal(causal_mask(q, k), want)
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        causal_mask(4, 3)


def test_prefix_mask_vs_dense_reference():
    length, p = 6, 3
    want = torch.tensor([[(i < p and j < p) or j <= i for j in range(length)] for i in range(length)])
    assert torch.equal(prefix_mask(length, p), want)
    assert torch.equal(prefix_mask(length, 0), causal_mask(length))
    with pytest.raises(ValueError):
        prefix_mask(3, 4)


def test_block_causal_mask_vs_dense_reference():
    sizes = [1, 4, 2]
    block = [b for b, s in enumerate(sizes) for _ in range(s)]
    want = torch.tensor([[block[j] <= block[i] for j in range(7)] for i in range(7)])
    assert torch.equal(block_causal_mask(sizes), want)
    assert torch.equal(block_causal_mask([1] * 5), causal_mask(5))
    with pytest.raises(ValueError):
        block_causal_mask([2, 0])


def test_key_padding_keeps_self_and_hides_padding():
    valid = torch.tensor([[True, False, True, False], [False, True, True, True]])
    got = with_key_padding(causal_mask(2, 4), valid)  # queries at positions 2 and 3
    assert got.shape == (2, 1, 2, 4)
    for b in range(2):
        for i, pos in enumerate((2, 3)):
            for j in range(4):
                want = (j <= pos and bool(valid[b, j])) or j == pos
                assert bool(got[b, 0, i, j]) == want


# ------------------------------------------------------------------ attention
def _attention_reference(att: Attention, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Explicit softmax attention in float64, kv heads repeated by hand."""
    q, k, v = att.qkv(x)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    rep = att.num_heads // att.num_kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(att.head_dim)
    scores = scores.masked_fill(~mask, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return att.wo.double()(out).float()


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_matches_explicit_softmax_reference(num_kv_heads):
    torch.manual_seed(0)
    att = Attention(32, 4, num_kv_heads)
    _randomise(att)
    x, rope = torch.randn(2, 6, 32), rope_table_2d(2, 3, 8)
    mask = prefix_mask(6, 2)
    got = att(x, rope, mask)
    want = _attention_reference(att, x, rope, mask)
    att.wo.float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_under_cpu_bf16_autocast_runs_sdpa_in_float32(monkeypatch):
    """Under CPU autocast the projections run in bf16 and SDPA itself in float32 (its bf16 backward is slow on
    CPUs): the output is bf16, close to the float32 module, and gradients reach the weights."""
    torch.manual_seed(0)
    att = Attention(32, 4)
    _randomise(att)
    x, rope, mask = torch.randn(2, 6, 32), rope_table_2d(2, 3, 8), prefix_mask(6, 2)
    seen = []
    sdpa = F.scaled_dot_product_attention
    spy = lambda q, *a, **kw: seen.append(q.dtype) or sdpa(q, *a, **kw)  # noqa: E731
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = att(x, rope, mask)
    assert got.dtype == torch.bfloat16 and seen == [torch.float32]
    torch.testing.assert_close(got.float(), att(x, rope, mask), rtol=0.05, atol=0.05)
    got.float().sum().backward()
    assert att.wqkv.weight.grad is not None and torch.isfinite(att.wqkv.weight.grad).all()


def test_fused_and_separate_qkv_agree():
    fused, split = Attention(16, 2, fused_qkv=True), Attention(16, 2, fused_qkv=False)
    _randomise(fused)
    with torch.no_grad():
        wq, wk, wv = fused.wqkv.weight.split(16)
        split.wq.weight.copy_(wq), split.wk.weight.copy_(wk), split.wv.weight.copy_(wv)
        split.wo.weight.copy_(fused.wo.weight)
    x = torch.randn(1, 4, 16)
    torch.testing.assert_close(fused(x, rope_table_1d(4, 8), causal_mask(4)),
                               split(x, rope_table_1d(4, 8), causal_mask(4)))


def test_attention_validates_heads():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="num_kv_heads must divide"):
        Attention(32, 4, 3)


# ------------------------------------------------------------------ KV cache + block
@pytest.mark.parametrize("num_kv_heads", [4, 2])
@torch.no_grad()
def test_block_cached_decoding_equals_full_pass(num_kv_heads):
    torch.manual_seed(1)
    blocks = torch.nn.ModuleList(TransformerBlock(32, 4, num_kv_heads, multiple_of=16) for _ in range(2))
    _randomise(blocks)
    x, rope = torch.randn(3, 7, 32), rope_table_1d(7, 8)

    def run(h, start, mask, cache):
        for i, b in enumerate(blocks):
            h = b(h, rope[start:start + h.shape[1]], mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(h.shape[1])
        return h

    full = run(x, 0, causal_mask(7), None)
    cache = KVCache(2, 3, num_kv_heads, 8, 8)
    parts = [run(x[:, :3], 0, causal_mask(3), cache)]  # prefill 3
    parts.append(run(x[:, 3:4], 3, None, cache))  # one-token step
    parts.append(run(x[:, 4:7], 4, causal_mask(3, 7), cache))  # three-token step
    assert cache.length == 7
    tol = 1e-5 * max(1.0, float(full.abs().max()))  # the fixtures' tolerance: relative to the output scale
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=tol)
    cache.truncate(4)  # roll back and redo the last three: same result
    torch.testing.assert_close(run(x[:, 4:7], 4, causal_mask(3, 7), cache), full[:, 4:7], rtol=0, atol=tol)
    with pytest.raises(ValueError, match="cannot add 2"):
        cache.advance(2)
    with pytest.raises(ValueError, match="truncate length"):
        cache.truncate(9)


def test_kv_cache_returns_views_without_copies():
    cache = KVCache(1, 2, 2, 5, 4)
    k, v = cache.layers[0].update(torch.ones(2, 2, 3, 4), torch.ones(2, 2, 3, 4))
    assert k.shape == (2, 2, 3, 4) and k.data_ptr() == cache.k.data_ptr() and v.data_ptr() == cache.v.data_ptr()


def test_block_is_prenorm_llama():
    block = TransformerBlock(16, 2, multiple_of=8, norm="rms")
    _randomise(block)
    x, rope, mask = torch.randn(2, 3, 16), rope_table_1d(3, 8), causal_mask(3)
    h = x + block.attention(block.attention_norm(x), rope, mask)
    torch.testing.assert_close(block(x, rope, mask), h + block.feed_forward(block.ffn_norm(h)))
    assert {n for n, _ in block.named_parameters()} >= {"attention_norm.weight", "attention.wqkv.weight",
                                                         "attention.wo.weight", "ffn_norm.weight",
                                                         "feed_forward.w1.weight"}  # LlamaGen's key names
    # residual dropout acts in training mode only
    drop = TransformerBlock(16, 2, multiple_of=8, dropout=0.5)
    drop.load_state_dict(block.state_dict())
    torch.testing.assert_close(drop.eval()(x, rope, mask), block(x, rope, mask))
    assert not torch.allclose(drop.train()(x, rope, mask), block(x, rope, mask))


# ------------------------------------------------------------------ prefixes
def test_class_prefix_null_row_and_dropout():
    prefix = ClassPrefix(8, num_classes=5, dropout=0.5)
    assert prefix.embedding_table.num_embeddings == 6
    labels = torch.arange(5).repeat(400)
    prefix.eval()
    x, valid = prefix(Condition(labels=labels))
    assert valid is None and torch.equal(x[:, 0], prefix.embedding_table(labels))
    assert torch.equal(prefix.null(3).x[:, 0], prefix.embedding_table.weight[5].expand(3, -1))
    prefix.train()
    torch.manual_seed(0)
    x, _ = prefix(Condition(labels=labels))
    dropped = (x[:, 0] == prefix.embedding_table.weight[5]).all(-1)
    assert 0.45 < dropped.float().mean() < 0.55  # 2000 rows, p = 0.5: ±5% is > 4 sigma
    assert torch.equal(prefix(Condition(labels=labels), drop=False).x, prefix.eval()(Condition(labels=labels)).x)


def test_class_prefix_rejects_bad_conditions():
    prefix = ClassPrefix(8, num_classes=5)
    prefix(Condition(labels=torch.tensor([5])))  # the null class may be asked for explicitly
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        prefix(Condition(labels=torch.tensor([6])))
    with pytest.raises(ValueError, match=r"labels must lie in"):
        prefix(Condition(labels=torch.tensor([-1])))
    with pytest.raises(TypeError, match="conditioned on 'class'"):
        prefix(Condition(features=torch.randn(1, 2, 3)))
    with pytest.raises(TypeError, match="must be a tokenloom.generators.Condition"):
        prefix(torch.tensor([1]))


def test_text_prefix_projection_null_and_mask():
    torch.manual_seed(0)
    prefix = TextPrefix(8, cond_dim=6, cond_len=3, dropout=1.0 - 1e-9, hidden=16)
    feats, mask = torch.randn(4, 3, 6), torch.tensor([[True, True, False]] * 4)
    prefix.eval()
    x, valid = prefix(Condition(features=feats, mask=mask))
    assert x.shape == (4, 3, 8) and torch.equal(valid, mask)
    torch.testing.assert_close(x, prefix.proj(feats))
    prefix.train()
    x, valid = prefix(Condition(features=feats, mask=mask))  # every row dropped: null features, all valid
    torch.testing.assert_close(x, prefix.null(4).x)
    assert valid.all()
    both = cat_prefixes(prefix.eval()(Condition(features=feats, mask=mask)), prefix.null(4))
    assert both.x.shape == (8, 3, 8) and torch.equal(both.key_valid[:4], mask) and both.key_valid[4:].all()
    with pytest.raises(ValueError, match=r"cond.features must have shape \[B, 3, 6\]"):
        prefix(Condition(features=torch.randn(1, 4, 6)))
    with pytest.raises(TypeError, match="conditioned on 'text'"):
        prefix(Condition(labels=torch.tensor([0])))


def test_start_prefix_and_factory_errors():
    prefix = make_prefix("none", 8)
    assert isinstance(prefix, StartPrefix)
    assert prefix(Condition(batch=3)).x.shape == (3, 1, 8)
    with pytest.raises(ValueError, match="no null condition"):
        prefix.null(2)
    with pytest.raises(ValueError, match="condition must be one of"):
        make_prefix("image", 8)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        make_prefix("class", 8)
    with pytest.raises(ValueError, match="cond_dim must be a positive int"):
        make_prefix("text", 8, cond_len=2)
    with pytest.raises(ValueError, match="cond_dropout must lie in"):
        make_prefix("class", 8, num_classes=2, dropout=1.0)
