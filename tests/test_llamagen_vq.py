"""LlamaGen VQ checkpoint → VQTokenizer reproduces the fixture (README §2) within its recommended tolerance.

Fixture roots: ``$TOKENLOOM_FIXTURES`` (default ``../shared/fixtures``) and ``tests/fixtures/alt_sizes``, folder
``llamagen/vq``. Every size (codebook, grid, levels, blocks, widths, checkpoint name) comes from the fixture's
config.json and checkpoint, so fixture sets of other sizes run unchanged.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenloom.interop.llamagen_vq import convert_llamagen_vq_state_dict, load_llamagen_vq
from tokenloom.tokens import Tokens

ROOTS = {"env": Path(os.environ["TOKENLOOM_FIXTURES"]), "alt_sizes": Path(__file__).parent / "fixtures" / "alt_sizes"}
FOLDERS = [pytest.param(root / "llamagen" / "vq", id=name,
                        marks=pytest.mark.skipif(not (root / "llamagen" / "vq" / "config.json").is_file(),
                                                 reason=f"no LlamaGen VQ fixture under {root}"))
           for name, root in ROOTS.items()]


def _close(got, ref):
    bound = 2e-5 * max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= bound


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _checkpoint(folder: Path) -> Path:
    return folder / _config(folder)["checkpoint"]["file"]


@pytest.fixture(scope="module", params=FOLDERS)
def converted(request):
    folder = request.param
    cfg = _config(folder)
    model = load_llamagen_vq(_checkpoint(folder), cfg["ModelArgs"], cfg["encoder_decoder_overrides"],
                             image_size=cfg["derived"]["image_size"])
    return model, load_file(str(folder / "io.safetensors")), cfg


def test_fixture_outputs_are_reproduced(converted):
    model, io, cfg = converted
    grid, args = cfg["derived"]["token_grid"], cfg["ModelArgs"]
    assert (model.spec.layout.h, model.spec.layout.w) == tuple(grid)
    assert model.spec.vocab_size == args["codebook_size"]
    batch = io["image"].shape[0]
    with torch.no_grad():
        image = io["image"]
        _close(model.encode_latent(image), io["pre_quant_latent"])
        q = model.quantize_images(image)
        _close(q.z_q, io["quant"])
        tokens = model.encode(image)
        assert torch.equal(tokens.data.flatten(), io["codes"])  # (b, row, col) order
        codes = Tokens(io["codes"].reshape(batch, model.spec.layout.length, 1), model.spec)
        _close(model.decode(codes), io["decoded"])


@pytest.mark.parametrize("folder", FOLDERS)
def test_bad_checkpoints_name_the_keys(folder):
    cfg = _config(folder)
    sd = torch.load(_checkpoint(folder), map_location="cpu", weights_only=True)["model"]
    args, ed = cfg["ModelArgs"], cfg["encoder_decoder_overrides"]
    size = cfg["derived"]["image_size"]
    broken = dict(sd)
    broken.pop("quant_conv.bias")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['quant_conv.bias'\].*unexpected keys \['extra.weight'\]"):
        load_llamagen_vq(broken, args, ed, image_size=size)
    with pytest.raises(ValueError, match="mis-shaped keys.*quantize.embedding.weight"):
        load_llamagen_vq(sd, {**args, "codebook_size": args["codebook_size"] + 1}, ed, image_size=size)
    levels = len(args["decoder_ch_mult"])
    renamed = convert_llamagen_vq_state_dict(sd, levels)
    # decoder list index j is level n-1-j: the lowest-resolution level's blocks land under up.{n-1}
    assert set(renamed) >= {f"decoder.up.{levels - 1}.block.0.norm1.weight", "encoder.mid.attn_1.q.weight",
                            f"encoder.down.{levels - 1}.attn.0.q.weight"}
    assert "quantize.codebook_used" not in renamed and not any("conv_blocks" in k for k in renamed)
