"""Recipes: dot-list overrides, key checking with "did you mean" hints, and the scripts' command line."""

import runpy
from pathlib import Path

import pytest
import yaml

from tokenloom.training.config_schema import apply_override, check_recipe, load_recipe_file
from tokenloom.training.entry import parse_recipe_args

ROOT = Path(__file__).resolve().parents[1]
GENERATOR_RECIPES = sorted((ROOT / "configs" / "generator").glob("*.yaml"))
TOKENIZER_RECIPES = sorted((ROOT / "configs" / "tokenizer").glob("*.yaml"))


@pytest.mark.parametrize("path", GENERATOR_RECIPES, ids=lambda p: p.stem)
def test_shipped_generator_recipes_pass_the_key_check(path):
    check_recipe(yaml.safe_load(path.read_text()), "generator")


@pytest.mark.parametrize("path", TOKENIZER_RECIPES, ids=lambda p: p.stem)
def test_shipped_tokenizer_recipes_pass_the_key_check(path):
    check_recipe(yaml.safe_load(path.read_text()), "tokenizer")


def _digits():
    return yaml.safe_load((ROOT / "configs" / "generator" / "digits_raster.yaml").read_text())


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
    ("generator.widht=8", "unknown config key 'generator.widht' (did you mean 'generator.width'?)"),
    ("data.image_sise=8", "unknown config key 'data.image_sise' (did you mean 'data.image_size'?)"),
    ("trian.lr=1", "unknown config key 'trian' (did you mean 'train'?)"),
    ("tokenizer.recipe.tokenizer.codebok_size=8",
     "in tokenizer.recipe: unknown config key 'tokenizer.codebok_size' (did you mean 'tokenizer.codebook_size'?)"),
    ("data.name=shape", "unknown data set 'shape' (did you mean 'shapes'?)"),
])
def test_a_typo_names_the_key_and_the_nearest_valid_one(override, message):
    cfg = _digits()
    apply_override(cfg, override)
    with pytest.raises(ValueError) as err:
        check_recipe(cfg, "generator")
    assert message in str(err.value)


def test_overrides_parse_yaml_values_and_reject_malformed_ones(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.1}}))
    cfg = load_recipe_file(path, ["train.lr=1e-4", "train.max_minutes=null", "generator.ch_mult=[1, 2]",
                                  "data.name=digits"])
    assert cfg == {"train": {"lr": 1e-4, "max_minutes": None}, "generator": {"ch_mult": [1, 2]},
                   "data": {"name": "digits"}}
    with pytest.raises(ValueError, match="must look like key.sub=value"):
        apply_override(cfg, "train.lr")
    with pytest.raises(ValueError, match="train.lr is a float, not a section"):
        apply_override(cfg, "train.lr.x=1")
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe_file(tmp_path / "missing.yaml")


def test_script_command_line_config_overrides_and_resume(tmp_path):
    path = ROOT / "configs" / "generator" / "digits_raster.yaml"
    cfg, out, progress = parse_recipe_args(["--config", str(path), "train.max_steps=5", "--resume", "latest",
                                            "--no-progress"], "generator", "test")
    assert cfg["train"]["max_steps"] == 5 and cfg["train"]["resume"] == "latest"
    assert out == str(Path("runs") / "digits_raster") and progress is False
    with pytest.raises(ValueError, match="did you mean 'train.max_steps'"):
        parse_recipe_args(["--config", str(path), "train.max_stesp=5"], "generator", "test")
    with pytest.raises(SystemExit):
        parse_recipe_args([str(path)], "generator", "test")  # the config is given with --config


def test_train_script_rejects_a_typo_before_training(tmp_path):
    main = runpy.run_path(str(ROOT / "scripts" / "train_tokenizer.py"))["main"]
    with pytest.raises(ValueError, match=r"did you mean 'train.batch_size'\?"):
        main(["--config", str(ROOT / "configs" / "tokenizer" / "vq_shapes.yaml"), "train.bach_size=4",
              "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
