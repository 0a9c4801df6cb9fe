"""The text-to-image recipe runner: rounds (saved after each), per-round step budgets, continuing from a folder."""

import json

import pytest
import torch

from tokenloom.tokenizers.vq import VQTokenizer
from tokenloom.training.text_to_image import train_text_to_image


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    torch.manual_seed(0)
    vq = VQTokenizer(image_size=16, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                     codebook_size=16, codebook_dim=4).eval()
    path = tmp_path_factory.mktemp("vq")
    vq.save_pretrained(path)
    return str(path)


def recipe(tokenizer_dir, **train):
    return {
        "tokenizer": {"path": tokenizer_dir},
        "data": {"name": "shapes", "split": "train", "image_size": 16, "num_samples": 16, "seed": 0},
        "conditioner": {"context_length": 12, "width": 32, "heads": 2, "layers": 1},
        "generator": {"name": "raster_ar", "width": 32, "depth": 1, "num_heads": 2, "multiple_of": 16},
        "train": {"batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "progress": False, "log_every": 1, **train},
        "sampling": {"guidance_scale": 2.0},
    }


def test_rounds_with_step_budgets_save_each_round(tokenizer_dir, tmp_path):
    out = tmp_path / "t2i"
    pipe = train_text_to_image(recipe(tokenizer_dir, round_steps=[2, 3], round_lr_decay=0.5), str(out),
                               progress=False)
    log = json.loads((out / "train_log.json").read_text())
    assert [r["steps"] for r in log["rounds"]] == [2, 3] and log["steps"] == 5
    assert log["rounds"][1]["history"][0]["lr"] <= 0.5e-3  # the second round's peak is decayed
    assert (out / "model_index.json").exists()
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 16, 16)


def test_init_from_continues_from_the_saved_weights(tokenizer_dir, tmp_path):
    first = tmp_path / "first"
    a = train_text_to_image(recipe(tokenizer_dir, max_steps=2), str(first), progress=False)
    cfg = recipe(tokenizer_dir, max_steps=1, lr=1e-12, warmup_steps=0, weight_decay=0.0)
    cfg["generator"] = {"init_from": str(first)}
    del cfg["conditioner"], cfg["tokenizer"]
    b = train_text_to_image(cfg, str(tmp_path / "second"), progress=False)
    for (name, pa), pb in zip(a.token_generator.state_dict().items(), b.token_generator.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert b.conditioner.config.token_ids == a.conditioner.config.token_ids


def test_bad_round_settings_and_init_from(tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="round_steps"):
        train_text_to_image(recipe(tokenizer_dir, round_steps=[0]), str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="rounds"):
        train_text_to_image(recipe(tokenizer_dir, rounds=2, round_steps=[1]), str(tmp_path / "x"), progress=False)
    cfg = recipe(tokenizer_dir, max_steps=1)
    cfg["generator"]["init_from"] = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="init_from"):
        train_text_to_image(cfg, str(tmp_path / "y"), progress=False)


def test_script_takes_config_and_dot_list_overrides(tokenizer_dir, tmp_path):
    import runpy
    from pathlib import Path

    import yaml

    cfg = recipe(tokenizer_dir, max_steps=50)
    del cfg["train"]["progress"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(cfg))
    main = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "train_text_to_image.py"))["main"]
    main(["--config", str(tmp_path / "r.yaml"), "train.max_steps=2", "--output-dir", str(tmp_path / "out"),
          "--no-progress"])
    assert json.loads((tmp_path / "out" / "train_log.json").read_text())["steps"] == 2
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "r.yaml"), "train.max_steps", "--output-dir", str(tmp_path / "o2")])
