"""LlamaGen VQ checkpoint → VQTokenizer reproduces the fixture (README §2) within its recommended tolerance."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenloom.interop.llamagen_vq import convert_llamagen_vq_state_dict, load_llamagen_vq
from tokenloom.tokens import Tokens

FIXTURE = Path(os.environ["TOKENLOOM_FIXTURES"]) / "llamagen" / "vq"
pytestmark = pytest.mark.skipif(not FIXTURE.exists(), reason="LlamaGen VQ fixture not available")


def _close(got, ref):
    bound = 2e-5 * max(1.0, float(ref.abs().max()))
    assert float((got - ref).abs().max()) <= bound


@pytest.fixture(scope="module")
def converted():
    cfg = json.loads((FIXTURE / "config.json").read_text())
    model = load_llamagen_vq(FIXTURE / cfg["checkpoint"]["file"], cfg["ModelArgs"], cfg["encoder_decoder_overrides"],
                             image_size=cfg["derived"]["image_size"])
    return model, load_file(str(FIXTURE / "io.safetensors"))


def test_fixture_outputs_are_reproduced(converted):
    model, io = converted
    assert model.spec.layout.length == 16 and model.spec.vocab_size == 128
    with torch.no_grad():
        image = io["image"]
        _close(model.encode_latent(image), io["pre_quant_latent"])
        q = model.quantize_images(image)
        _close(q.z_q, io["quant"])
        tokens = model.encode(image)
        assert torch.equal(tokens.data.flatten(), io["codes"])  # (b, row, col) order
        _close(model.decode(Tokens(io["codes"].reshape(2, 16, 1), model.spec)), io["decoded"])


def test_bad_checkpoints_name_the_keys():
    sd = torch.load(FIXTURE / "vq_tiny.pt", map_location="cpu", weights_only=True)["model"]
    cfg = json.loads((FIXTURE / "config.json").read_text())
    args, ed = cfg["ModelArgs"], cfg["encoder_decoder_overrides"]
    broken = dict(sd)
    broken.pop("quant_conv.bias")
    broken["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['quant_conv.bias'\].*unexpected keys \['extra.weight'\]"):
        load_llamagen_vq(broken, args, ed, image_size=8)
    with pytest.raises(ValueError, match="mis-shaped keys.*quantize.embedding.weight"):
        load_llamagen_vq(sd, {**args, "codebook_size": 64}, ed, image_size=8)
    renamed = convert_llamagen_vq_state_dict(sd, 2)
    assert "decoder.up.0.block.0.nin_shortcut.weight" in renamed and "encoder.mid.attn_1.q.weight" in renamed
    assert "quantize.codebook_used" not in renamed
