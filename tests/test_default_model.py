"""The text-to-image model that ships inside the package: it loads with no model argument and generates, offline,
deterministically; and ``python -m tokenloom.demo`` writes its PNGs."""

from pathlib import Path

import numpy as np
import pytest
import torch

import tokenloom
from tokenloom.pipelines.registry import default_model

ASSET = Path(tokenloom.__file__).resolve().parent / "assets" / "default" / "text-to-image"


@pytest.fixture(scope="module")
def pipe():
    if not (ASSET / "model_index.json").exists():
        pytest.fail(f"the packaged default text-to-image model is missing: {ASSET}")
    p = tokenloom.pipeline("text-to-image")
    p.set_progress_bar_config(disable=True)
    return p


def test_default_is_the_packaged_folder(monkeypatch):
    monkeypatch.delenv("TOKENLOOM_DEFAULT_MODEL", raising=False)
    assert default_model("text-to-image") == ASSET


def test_package_size_and_safetensors_only():
    files = [p for p in ASSET.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert len([p for p in files if p.suffix == ".safetensors"]) == 4


def test_generates_one_image_same_seed_same_image(pipe):
    out = pipe("a green triangle", generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 32, 32)
    again = pipe("a green triangle", generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.equal(out.images, again.images)
    other = pipe("a green triangle", generator=torch.Generator().manual_seed(1), output_type="pt")
    assert not torch.equal(out.tokens.data, other.tokens.data)


def test_pil_output(pipe):
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32) and image.mode == "RGB"
    assert np.asarray(image).max() > 100  # something was drawn on the black background


def test_demo_writes_grid(tmp_path, capsys):
    from tokenloom import demo

    paths = demo.main(["--out", str(tmp_path), "--per-prompt", "1"])
    assert len(paths) == len(demo.PROMPTS) + 1
    assert all(Path(p).is_file() for p in paths)
    printed = capsys.readouterr().out
    assert str(tmp_path / "grid.png") in printed


def test_recipe_files_describe_the_packaged_model():
    """scripts/train_default.sh's seven recipes pass the recipe schema and agree with the shipped folder: the
    architecture (stage 1), the sampling defaults and the last stage's rounds (its train_log.json)."""
    import json

    from tokenloom.training.config_schema import load_recipe_file

    root = Path(__file__).resolve().parents[1] / "configs" / "pipeline"
    stages = [load_recipe_file(str(root / f"shapes_default{name}.yaml"), [] if i == 0 else ["generator.init_from=x"])
              for i, name in enumerate(("", "_finetune", "_stage3", "_stage4", "_stage5", "_stage6", "_stage7"))]
    shipped = json.loads((ASSET / "token_generator" / "config.json").read_text())
    for key in ("width", "depth", "num_heads", "prefix_rope"):
        assert stages[0]["generator"][key] == shipped[key], key
    defaults = json.loads((ASSET / "model_index.json").read_text())["sampling_defaults"]
    for stage in stages[1:]:
        assert stage["generator"] == {"init_from": "x"} and stage["train"]["ema_decay"] == 0.999
    assert stages[-1]["sampling"]["guidance_scale"] == defaults["guidance_scale"]
    log = json.loads((ASSET / "train_log.json").read_text())
    assert [r["steps"] for r in log["rounds"]] == stages[-1]["train"]["round_steps"]


def test_default_reranks_with_the_scorer_its_recipe_trains(pipe):
    """The packaged folder keeps the best of its candidates by a CaptionScorer built as
    configs/scoring/shapes_captioner.yaml says, as scripts/train_default.sh attaches it."""
    import json

    from tokenloom.scoring.captioner import CaptionScorer
    from tokenloom.training.config_schema import load_recipe_file
    from tokenloom.training.scorer_trainer import check_scorer_recipe

    recipe = load_recipe_file(str(Path(__file__).resolve().parents[1] / "configs" / "scoring" /
                                  "shapes_captioner.yaml"))
    check_scorer_recipe(recipe)
    shipped = json.loads((ASSET / "scorer" / "config.json").read_text())
    assert {k: shipped[k] for k in recipe["scorer"]} == recipe["scorer"]
    assert isinstance(pipe.scorer, CaptionScorer)
    script = (Path(__file__).resolve().parents[1] / "scripts" / "train_default.sh").read_text()
    assert f"--num-candidates {pipe.config.num_candidates}" in script and pipe.config.num_candidates > 1
