"""LlamaGen c2i GPT fixture → RasterAR: logits (full and KV-cached) and the RoPE table match the reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tokenloom.generators.condition import Condition
from tokenloom.interop.llamagen_gpt import convert_llamagen_gpt, raster_ar_config
from tokenloom.tokens import Tokens

FIXTURE = Path(os.environ["TOKENLOOM_FIXTURES"]) / "llamagen" / "gpt"
pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="LlamaGen GPT fixture not available")


def _tol(ref: torch.Tensor) -> float:
    return 2e-5 * max(1.0, float(ref.abs().max()))  # the fixtures README's acceptance bound


@pytest.fixture(scope="module")
def converted():
    from safetensors.torch import load_file

    args = json.loads((FIXTURE / "config.json").read_text())["ModelArgs"]
    return convert_llamagen_gpt(FIXTURE / "c2i_tiny.pt", args), load_file(str(FIXTURE / "io.safetensors"))


@torch.no_grad()
def test_full_forward_matches_llamagen(converted):
    model, io = converted
    assert torch.equal(model.rope_table, io["freqs_cis"])
    out = model(Tokens(io["codes"][..., None], model.spec), io["labels"])  # the last label is the null class
    got = out["logits"][:, :, 0]
    assert (got - io["logits"]).abs().max() <= _tol(io["logits"])


@torch.no_grad()
def test_kv_cached_decoding_matches_llamagen(converted):
    model, io = converted
    codes = io["codes"]
    cache = model.new_cache(codes.shape[0])
    zs = [model.prefill(model.embed_prefix(Condition(labels=io["labels"])), cache)[:, None]]
    for t in range(codes.shape[1] - 1):
        zs.append(model.step(codes[:, t:t + 1], cache))
    z = torch.cat(zs, 1)
    got = model.output_head.logits(z.flatten(0, 1)).unflatten(0, z.shape[:2])[:, :, 0]
    assert (got - io["logits_kv_cached"]).abs().max() <= _tol(io["logits_kv_cached"])


def test_bad_checkpoints_and_args_fail_clearly():
    args = json.loads((FIXTURE / "config.json").read_text())["ModelArgs"]
    with pytest.raises(NotImplementedError, match="only LlamaGen c2i"):
        raster_ar_config({**args, "model_type": "t2i"})
    with pytest.raises(ValueError, match="square number"):
        raster_ar_config({**args, "block_size": 15})
    state = torch.load(FIXTURE / "c2i_tiny.pt", weights_only=True)["model"]
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\], unexpected keys \['extra.weight'\]"):
        convert_llamagen_gpt(state, args)
    with pytest.raises(ValueError, match="mis-shaped keys"):
        convert_llamagen_gpt(FIXTURE / "c2i_tiny.pt", {**args, "vocab_size": 64})
