"""LlamaGen c2i GPT fixture → RasterAR: logits (full and KV-cached) and the RoPE table match the reference.

Fixture roots: ``$TOKENLOOM_FIXTURES`` (default ``../shared/fixtures``) and ``tests/fixtures/alt_sizes``, folder
``llamagen/gpt``. Every size comes from the fixture's config.json and checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tokenloom.generators.condition import Condition
from tokenloom.interop.llamagen_gpt import convert_llamagen_gpt, raster_ar_config
from tokenloom.tokens import Tokens

ROOTS = {"env": Path(os.environ["TOKENLOOM_FIXTURES"]), "alt_sizes": Path(__file__).parent / "fixtures" / "alt_sizes"}
FOLDERS = [pytest.param(root / "llamagen" / "gpt", id=name,
                        marks=pytest.mark.skipif(not (root / "llamagen" / "gpt" / "config.json").is_file(),
                                                 reason=f"no LlamaGen GPT fixture under {root}"))
           for name, root in ROOTS.items()]


def _tol(ref: torch.Tensor) -> float:
    return 2e-5 * max(1.0, float(ref.abs().max()))  # the fixtures README's acceptance bound


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _checkpoint(folder: Path) -> Path:
    return folder / _config(folder)["checkpoint"]["file"]


@pytest.fixture(scope="module", params=FOLDERS)
def converted(request):
    from safetensors.torch import load_file

    folder = request.param
    args = _config(folder)["ModelArgs"]
    return convert_llamagen_gpt(_checkpoint(folder), args), load_file(str(folder / "io.safetensors"))


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


@pytest.mark.parametrize("folder", FOLDERS)
def test_sizes_follow_the_config(folder):
    cfg = _config(folder)
    args, derived = cfg["ModelArgs"], cfg["derived"]
    model = convert_llamagen_gpt(_checkpoint(folder), args)
    assert [model.spec.layout.h, model.spec.layout.w] == derived["token_grid"]
    assert model.spec.vocab_size == args["vocab_size"] and model.config.num_classes == args["num_classes"]
    assert (model.config.width, model.config.depth, model.config.num_heads) == (args["dim"], args["n_layer"],
                                                                               args["n_head"])
    assert tuple(model.rope_table.shape) == tuple(derived["freqs_cis_shape"])


@pytest.mark.parametrize("folder", FOLDERS)
def test_bad_checkpoints_and_args_fail_clearly(folder):
    args = _config(folder)["ModelArgs"]
    with pytest.raises(NotImplementedError, match="only LlamaGen c2i"):
        raster_ar_config({**args, "model_type": "t2i"})
    with pytest.raises(ValueError, match="square number"):
        raster_ar_config({**args, "block_size": args["block_size"] + 2})  # n² + 2 is never a square
    state = torch.load(_checkpoint(folder), weights_only=True)["model"]
    del state["norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\], unexpected keys \['extra.weight'\]"):
        convert_llamagen_gpt(state, args)
    with pytest.raises(ValueError, match="mis-shaped keys"):
        convert_llamagen_gpt(_checkpoint(folder), {**args, "vocab_size": args["vocab_size"] + 1})
