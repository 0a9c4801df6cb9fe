"""Best-of-k reranking in the text-to-image pipeline: the kept image is the scorer's best candidate, seeds stay
per-image, the setting round-trips through a folder, and bad settings are refused."""

import pytest
import torch

from tests.pipeline_tiny import CAPTIONS, components, seeded
from tokenloom.modeling import TokenloomModel
from tokenloom.pipelines.base import row_generators
from tokenloom.pipelines.rerank import candidate_generators
from tokenloom.pipelines.text_to_image import TextToImagePipeline
from tokenloom.scoring.captioner import CaptionScorer


class BrightnessScorer(TokenloomModel):
    """Prefers bright images, and records what it was shown: a scorer whose choice a test can recompute."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # a device for the pipeline to find
        self.seen = []

    def score(self, images, prompts):
        assert len(images) == len(prompts)
        self.seen.append((images.clone(), list(prompts)))
        return images.float().mean(dim=(1, 2, 3))


def tiny_scorer() -> CaptionScorer:
    torch.manual_seed(3)
    return CaptionScorer(image_size=8, channels=(8, 16), width=16, layers=1, heads=2, context_length=12).eval()


@pytest.fixture(scope="module")
def parts():
    return components("raster", condition="text")


def test_kept_image_is_the_best_candidate(parts):
    k, scorer = 4, BrightnessScorer()
    pipe = TextToImagePipeline(*parts, scorer=scorer, num_candidates=k)
    out = pipe(CAPTIONS[:2], num_images_per_prompt=2, generator=seeded(0, 1, 2, 3), output_type="pt").images
    (cands, prompts), = scorer.seen
    assert prompts == [p for p in CAPTIONS[:2] for _ in range(2 * k)]  # row-major: image r's k candidates
    brightness = cands.mean(dim=(1, 2, 3)).view(4, k)
    assert (brightness.max(dim=1).values > brightness.min(dim=1).values).all()  # the candidates differ
    best = cands.view(4, k, *cands.shape[1:])[torch.arange(4), brightness.argmax(dim=1)]
    torch.testing.assert_close(out, (best + 1) / 2)
    # each image's candidates come from generators its own seed makes
    first = candidate_generators(row_generators(seeded(0), 1, "cpu"), k)
    again = candidate_generators(row_generators(seeded(0), 1, "cpu"), k)
    assert [g.initial_seed() for g in first] == [g.initial_seed() for g in again]
    assert len({g.initial_seed() for g in first}) == k


def test_one_candidate_is_plain_sampling(parts):
    with_scorer = TextToImagePipeline(*parts, scorer=BrightnessScorer(), num_candidates=1)
    plain = TextToImagePipeline(*parts)
    a = with_scorer(CAPTIONS[0], generator=seeded(5), output_type="tokens").tokens.data
    b = plain(CAPTIONS[0], generator=seeded(5), output_type="tokens").tokens.data
    assert torch.equal(a, b)
    c = with_scorer(CAPTIONS[0], generator=seeded(5), output_type="tokens", num_candidates=3).tokens.data
    assert c.shape == a.shape


def test_image_depends_only_on_its_own_seed(parts):
    pipe = TextToImagePipeline(*parts, scorer=BrightnessScorer(), num_candidates=3)
    alone = pipe(CAPTIONS[1], generator=seeded(7), output_type="tokens").tokens.data
    batch = pipe([CAPTIONS[0], CAPTIONS[1]], generator=seeded(9, 7), output_type="tokens").tokens.data
    assert torch.equal(alone[0], batch[1])


def test_caption_scorer_round_trips_through_a_folder(parts, tmp_path):
    pipe = TextToImagePipeline(*parts, scorer=tiny_scorer(), num_candidates=3)
    pipe.save_pretrained(tmp_path / "p")
    loaded = TextToImagePipeline.from_pretrained(str(tmp_path / "p"))
    assert isinstance(loaded.scorer, CaptionScorer) and loaded.config.num_candidates == 3
    a = pipe(CAPTIONS[2], generator=seeded(1), output_type="tokens").tokens.data
    b = loaded(CAPTIONS[2], generator=seeded(1), output_type="tokens").tokens.data
    assert torch.equal(a, b)
    again = TextToImagePipeline.from_pipe(loaded)
    assert again.scorer is loaded.scorer and again.config.num_candidates == 3


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "4"])
def test_bad_num_candidates_is_named(parts, value):
    pipe = TextToImagePipeline(*parts, scorer=BrightnessScorer())
    with pytest.raises(ValueError, match="num_candidates must be a positive int"):
        pipe(CAPTIONS[0], num_candidates=value)
    with pytest.raises(ValueError, match="num_candidates must be a positive int"):
        TextToImagePipeline(*parts, scorer=BrightnessScorer(), num_candidates=value)


def test_candidates_without_a_scorer_are_refused(parts):
    with pytest.raises(ValueError, match="num_candidates=4 needs a scorer"):
        TextToImagePipeline(*parts, num_candidates=4)
    with pytest.raises(ValueError, match="num_candidates=2 needs a scorer"):
        TextToImagePipeline(*parts)(CAPTIONS[0], num_candidates=2)


def test_attach_scorer_script_writes_a_reranking_folder(parts, tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "attach_scorer.py"
    spec = importlib.util.spec_from_file_location("attach_scorer", script)
    attach = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attach)
    TextToImagePipeline(*parts).save_pretrained(tmp_path / "plain")
    tiny_scorer().save_pretrained(tmp_path / "scorer")
    attach.main(["--model", str(tmp_path / "plain"), "--scorer", str(tmp_path / "scorer"), "--num-candidates", "5",
                 "--out", str(tmp_path / "ranked")])
    ranked = TextToImagePipeline.from_pretrained(str(tmp_path / "ranked"))
    assert isinstance(ranked.scorer, CaptionScorer) and ranked.config.num_candidates == 5
    assert "keeps the best of 5 candidates" in (tmp_path / "ranked" / "README.md").read_text()
