"""Named recipes used by the demo: thin wrappers around the YAML recipes in ``configs/``."""

from __future__ import annotations

from pathlib import Path

import yaml

from tokenloom.training.config_schema import RecipeLoader

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def load_recipe(relative: str) -> dict:
    """A recipe from the repository's ``configs/`` folder (e.g. ``"pipeline/shapes_text_to_image.yaml"``)."""
    path = CONFIGS / relative
    if not path.exists():
        raise ValueError(f"recipe {relative!r} not found under {CONFIGS} (recipes ship with the repository)")
    return yaml.load(path.read_text(), Loader=RecipeLoader)


def train_shapes_text_to_image(output_dir, minutes: float = 9.0, progress: bool = True):
    """The demo's text-to-image model on shapes, scaled to a total budget of ``minutes``."""
    from tokenloom.training.text_to_image import train_text_to_image

    cfg = load_recipe("pipeline/shapes_text_to_image.yaml")
    tok_train = cfg["tokenizer"]["recipe"]["train"]
    total = tok_train["max_minutes"] + cfg["train"]["max_minutes"]
    scale = minutes / total
    tok_train["max_minutes"] *= scale
    cfg["train"]["max_minutes"] *= scale
    return train_text_to_image(cfg, str(output_dir), progress=progress)
