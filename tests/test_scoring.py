"""The caption scorer: log p(prompt | image) is a real caption likelihood (normalised, causal, padding-blind), it
learns to prefer the true image, its recipe trains end to end, and bad input is named."""

import json

import pytest
import torch

from tests.pipeline_tiny import randomize
from tokenloom.conditioning.openclip_text import caption_token_ids
from tokenloom.data.shapes import ShapesDataset
from tokenloom.scoring.captioner import CaptionScorer
from tokenloom.training.scorer_trainer import check_scorer_recipe, train_scorer_from_config

WORDS = ["a red circle", "a blue square", "two squares", "a circle above a square"]


def tiny_scorer(image_size: int = 16, **kw) -> CaptionScorer:
    torch.manual_seed(0)
    ids = caption_token_ids(WORDS)
    return CaptionScorer(image_size=image_size, channels=(8, 16), width=16, layers=1, heads=2, token_ids=ids, **kw)


def test_score_is_the_sum_of_normalised_next_token_log_probs():
    m = randomize(tiny_scorer())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ids = m.tokenize(WORDS[:2])
    logits = m(x, ids)
    assert logits.shape == (2, ids.shape[1] - 1, m.head.out_features)
    expected = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = (expected * (ids[:, 1:] != 0)).sum(1)
    torch.testing.assert_close(m.score(x, WORDS[:2]), expected)
    # summed over every possible next token, each position's probabilities make 1 (a real distribution)
    torch.testing.assert_close(torch.softmax(logits, -1).sum(-1), torch.ones(logits.shape[:2]))


def test_prediction_is_causal_and_padding_blind():
    m = randomize(tiny_scorer())
    x = torch.rand(1, 3, 16, 16)
    a, b = m.tokenize(["a red circle"]), m.tokenize(["a red square"])
    first = int((a != b).float().argmax())  # first differing token
    la, lb = m(x, a), m(x, b)
    torch.testing.assert_close(la[:, :first], lb[:, :first])  # positions before it cannot see it
    assert not torch.allclose(la[:, first:], lb[:, first:])
    m2 = randomize(tiny_scorer())
    m2.token_embedding.weight.data[0].normal_()  # the padding row's embedding must not change the score
    torch.testing.assert_close(m2.score(x, ["a red circle"]), m.score(x, ["a red circle"]))


def test_bad_input_is_named():
    m = tiny_scorer()
    with pytest.raises(ValueError, match="B = len\\(prompts\\) = 2"):
        m.score(torch.zeros(3, 3, 16, 16), ["a", "b"])
    with pytest.raises(ValueError, match="must be 16x16"):
        m.score(torch.zeros(1, 3, 32, 32), ["a circle"])
    with pytest.raises(TypeError, match="prompt must be a string"):
        m.score(torch.zeros(1, 3, 16, 16), [3])
    with pytest.raises(ValueError, match="image_size=18 must be divisible by 2"):
        CaptionScorer(image_size=18, channels=(8, 16, 32))


def test_recipe_trains_a_scorer_that_prefers_the_true_image(tmp_path):
    """150 steps on one-object scenes ("a triangle that is yellow"): the true image must win most comparisons."""
    cfg = {"scorer": {"image_size": 16, "channels": [16, 32], "width": 32, "layers": 1, "heads": 2,
                      "context_length": 12},
           "data": {"name": "shapes", "image_size": 16, "num_samples": 4800, "seed": 0, "categories": ["colors"]},
           "eval_data": {"name": "shapes", "split": "test", "image_size": 16, "num_samples": 64,
                         "categories": ["colors"]},
           "train": {"max_steps": 150, "batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "log_every": 50,
                     "log_with": "none", "progress": False, "threads": 1}}
    out = train_scorer_from_config(cfg, output_dir=str(tmp_path / "s"))
    report = json.loads((tmp_path / "s" / "eval.json").read_text())
    assert report["caption_nll_per_token"] < 1.0
    model = out["model"]
    test = ShapesDataset("test", image_size=16, num_samples=200, seed=1, categories=["colors"])
    items = [test[i] for i in range(200)]
    images = torch.stack([it["image"] for it in items])
    captions = [it["caption"] for it in items]
    own = model.score(images, captions)
    other = model.score(images.roll(1, 0), captions)  # each caption against its neighbour's image
    differs = torch.tensor([a != b for a, b in zip(captions, captions[1:] + captions[:1])])
    assert ((own > other) | ~differs).float().mean() > 0.8
    loaded = CaptionScorer.from_pretrained(str(tmp_path / "s"))
    torch.testing.assert_close(loaded.score(images[:4], captions[:4]), own[:4])


def test_recipe_keys_are_checked():
    with pytest.raises(ValueError, match="train.max_step"):
        check_scorer_recipe({"scorer": {}, "data": {"name": "shapes"}, "train": {"max_step": 3}})
    with pytest.raises(ValueError, match="'data' section"):
        check_scorer_recipe({"scorer": {}})
    with pytest.raises(ValueError, match="scorer.chanels"):
        check_scorer_recipe({"scorer": {"chanels": [8]}, "data": {"name": "shapes"}})
