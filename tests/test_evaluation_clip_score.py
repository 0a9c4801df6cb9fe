"""CLIP score on a tiny randomly initialised open_clip model (no download)."""

import json
import urllib.request

import pytest
import torch
from evaluation_helpers import _no_download


# ----------------------------------------------------------------------------- CLIP score
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised tiny open_clip model (under a test-only name) and its weights file."""
    import open_clip

    root = tmp_path_factory.mktemp("tiny_clip")
    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (root / "tokenloom-test-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(root / "tokenloom-test-tiny-clip.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tokenloom-test-tiny-clip", pretrained=None)
    torch.save(model.state_dict(), root / "tiny_clip.pt")
    return model, preprocess, open_clip.get_tokenizer("tokenloom-test-tiny-clip"), root / "tiny_clip.pt"


def test_clip_score_mechanics(tiny_clip, monkeypatch):
    from tokenloom.evaluation.clip_score import CLIPScorer, _to_pil, clip_score

    monkeypatch.setattr(urllib.request, "urlopen", _no_download)
    model, preprocess, tokenizer, weights = tiny_clip
    scorer = CLIPScorer.from_model(model, preprocess, tokenizer, "tiny")
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    captions = [f"a photo of {n} circles" for n in range(6)]
    scores = scorer(images, captions)
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in _to_pil(images)])
        cos = torch.nn.functional.cosine_similarity(
            model.encode_image(pixels), model.encode_text(tokenizer(captions))
        )
    torch.testing.assert_close(scores, (100 * cos).clamp(min=0))
    assert ((scores >= 0) & (scores <= 100)).all()
    result = clip_score(images, captions, scorer, batch_size=4)
    assert result.value == pytest.approx(scores.mean().item(), rel=1e-5) and result.n == 6
    from_file = CLIPScorer("tokenloom-test-tiny-clip", pretrained=weights)  # the local-path route
    torch.testing.assert_close(from_file(images, captions), scores)
    assert from_file.name == "tokenloom-test-tiny-clip:tiny_clip.pt"
    with pytest.raises(FileNotFoundError, match="missing_clip.bin"):
        CLIPScorer("ViT-B-32", pretrained=weights.parent / "missing_clip.bin")
    with pytest.raises(ValueError, match="captions"):
        scorer(images, captions[:2])
