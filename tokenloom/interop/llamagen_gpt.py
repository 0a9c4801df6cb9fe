"""Convert a LlamaGen class-conditional GPT (``autoregressive/models/gpt.py``, ``model_type="c2i"``) to RasterAR.

LlamaGen's module tree is RasterAR's except for two names (fixtures README §3):
``cls_embedding.embedding_table`` → ``prefix.embedding_table`` and ``output`` → ``output_head.proj``.
RasterAR reproduces LlamaGen's conventions by configuration: interleaved 2D RoPE with a zero class row
(``prefix_rope="zero"``), RMSNorm in float32, SwiGLU with LlamaGen's hidden size, fused ``wqkv``, no biases.

Checkpoints are read with ``torch.load(weights_only=True)``; DDP-style ``{"model": state_dict}`` containers
and bare state dicts are both accepted.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from tokenloom.generators.raster_ar import RasterAR
from tokenloom.tokens import Grid, TokenSpec

RENAMES = (("cls_embedding.embedding_table.", "prefix.embedding_table."), ("output.", "output_head.proj."))
SUPPORTED_ARGS = {"dim", "n_layer", "n_head", "n_kv_head", "multiple_of", "ffn_dim_multiplier", "rope_base",
                  "norm_eps", "initializer_range", "token_dropout_p", "attn_dropout_p", "resid_dropout_p",
                  "ffn_dropout_p", "drop_path_rate", "num_classes", "caption_dim", "class_dropout_prob",
                  "model_type", "vocab_size", "cls_token_num", "block_size", "max_batch_size", "max_seq_len"}


def raster_ar_config(model_args: dict) -> dict:
    """RasterAR config from LlamaGen's ``ModelArgs`` fields (as a dict)."""
    unknown = set(model_args) - SUPPORTED_ARGS
    if unknown:
        raise ValueError(f"unknown LlamaGen ModelArgs fields {sorted(unknown)}; known: {sorted(SUPPORTED_ARGS)}")
    if model_args.get("model_type", "c2i") != "c2i" or model_args.get("cls_token_num", 1) != 1:
        raise NotImplementedError(f"only LlamaGen c2i models with cls_token_num=1 convert for now, got "
                                  f"model_type={model_args.get('model_type')!r}, "
                                  f"cls_token_num={model_args.get('cls_token_num')!r}")
    block = int(model_args["block_size"])
    grid = math.isqrt(block)
    if grid * grid != block:
        raise ValueError(f"LlamaGen block_size must be a square number of tokens, got {block}")
    spec = TokenSpec(kind="index", vocab_size=int(model_args["vocab_size"]), layout=Grid(grid, grid))
    return dict(
        token_spec=spec.to_dict(), width=model_args["dim"], depth=model_args["n_layer"],
        num_heads=model_args["n_head"], num_kv_heads=model_args.get("n_kv_head"), mlp="swiglu",
        multiple_of=model_args.get("multiple_of", 256), ffn_dim_multiplier=model_args.get("ffn_dim_multiplier"),
        norm_type="rms", norm_eps=model_args.get("norm_eps", 1e-5), rope_type="2d",
        rope_base=float(model_args.get("rope_base", 10000)), prefix_rope="zero", fused_qkv=True,
        condition="class", num_classes=model_args["num_classes"],
        cond_dropout=model_args.get("class_dropout_prob", 0.1), head="categorical", head_options={"bias": False},
        initializer_range=model_args.get("initializer_range", 0.02),
    )


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a LlamaGen checkpoint (``{"model": sd}``, ``{"module": sd}`` or a bare state dict) safely."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key]
    return obj


def rename_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for old, new in RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def convert_llamagen_gpt(checkpoint: str | Path | dict, model_args: dict) -> RasterAR:
    """Build a RasterAR from LlamaGen ``ModelArgs`` (dict) and a checkpoint path or state dict.

    Raises ``ValueError`` naming missing, unexpected and mis-shaped keys.
    """
    model = RasterAR(**raster_ar_config(model_args))
    state = load_state_dict(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    state = rename_state_dict(state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or mis:
        raise ValueError(f"LlamaGen checkpoint does not fit RasterAR{model_args}: missing keys {missing}, "
                         f"unexpected keys {unexpected}, mis-shaped keys {mis}")
    model.load_state_dict(state, strict=True)
    return model.eval()
