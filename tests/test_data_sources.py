"""Data beyond the built-in sets: image folders, WebDataset tar shards, Hugging Face rows, token shards
(round trip through scripts/pretokenize.py and generator training), and the per-rank batch plan."""

import io
import os
import runpy
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenloom.data.hf_datasets import HFImageDataset
from tokenloom.data.image_folder import ImageFolderDataset
from tokenloom.data.webdataset import WebDatasetImages
from tokenloom.training.data_sources import build_dataset
from tokenloom.training.data_stream import batch_stream

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(color, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root: Path, broken: int = 0) -> Path:
    for name, color in (("red_square", (255, 0, 0)), ("blue_circle", (0, 0, 255))):
        (root / name).mkdir(parents=True)
        for i in range(3):
            (root / name / f"{i}.png").write_bytes(png_bytes(color))
    for i in range(broken):
        (root / "red_square" / f"broken{i}.jpg").write_bytes(b"not an image")
    (root / "red_square" / "notes.txt").write_text("ignored: not an image extension")
    return root


def make_shards(root: Path, n_shards: int = 3, per_shard: int = 4, broken: bool = False) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:02d}{i:04d}"
                value = s * per_shard + i
                members = {f"{key}.png": png_bytes((value * 10, 0, 255 - value * 10)),
                           f"{key}.txt": f"item {value}".encode(), f"{key}.cls": str(value % 2).encode()}
                if broken and i == 0:
                    members[f"{key}.png"] = b"garbage"
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------- image folders
def test_image_folder_is_class_conditional_and_skips_unreadable_files(tmp_path):
    with pytest.warns(UserWarning, match="skipped 2 unreadable image"):
        ds = build_dataset("image_folder", root=str(make_folder(tmp_path / "f", broken=2)), image_size=8)
    assert len(ds) == 6 and ds.skipped == 2 and ds.classes == ["blue_circle", "red_square"]
    item = ds[0]
    assert item["image"].shape == (3, 8, 8) and item["label"] == 0 and item["caption"] == "blue circle"
    torch.testing.assert_close(item["image"][:, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))
    assert ds[5]["label"] == 1 and ds[5]["image"][0].min() == 1.0


def test_image_folder_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(str(tmp_path / "empty"))
    (tmp_path / "empty" / "cls").mkdir()
    with pytest.raises(ValueError, match="holds no readable images"):
        ImageFolderDataset(str(tmp_path / "empty"))


# ---------------------------------------------------------------- WebDataset shards
def test_webdataset_pass_decodes_images_captions_and_labels(tmp_path):
    make_shards(tmp_path / "wds")
    ds = WebDatasetImages(str(tmp_path / "wds"), image_size=8)
    items = list(ds)
    assert [it["caption"] for it in items] == [f"item {v}" for v in range(12)]
    assert [it["label"] for it in items] == [v % 2 for v in range(12)]
    assert items[0]["image"].shape == (3, 8, 8)
    assert WebDatasetImages(str(tmp_path / "wds" / "shard-{0000..0001}.tar")).shards == \
        [str(tmp_path / "wds" / f"shard-{i:04d}.tar") for i in range(2)]
    with pytest.raises(ValueError, match="not found"):
        WebDatasetImages(str(tmp_path / "wds" / "shard-{0000..0009}.tar"))
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="names no WebDataset shards"):
        WebDatasetImages(str(tmp_path / "none"))


def test_webdataset_skips_undecodable_samples_with_a_warning(tmp_path):
    make_shards(tmp_path / "wds", n_shards=2, broken=True)
    ds = WebDatasetImages(str(tmp_path / "wds"), image_size=8)
    with pytest.warns(UserWarning, match="skipped 1 sample"):
        items = list(ds)
    assert len(items) == 6 and ds.skipped == 2


def test_webdataset_streams_are_disjoint_per_rank_deterministic_and_resumable(tmp_path):
    ds = WebDatasetImages(make_shards(tmp_path / "wds", n_shards=4, per_shard=3), image_size=8, shuffle_buffer=4)

    def captions(rank, world, n, skip=0):
        it = ds.stream(seed=7, rank=rank, world=world, skip=skip)
        return [next(it)["caption"] for _ in range(n)]

    epoch = [captions(r, 2, 6) for r in (0, 1)]
    assert set(epoch[0]).isdisjoint(epoch[1]) and len(set(epoch[0]) | set(epoch[1])) == 12
    assert captions(0, 2, 6) == epoch[0]
    assert captions(0, 2, 10)[4:] == captions(0, 2, 6, skip=4)  # resumption skips what was consumed
    assert captions(0, 1, 12) != captions(0, 1, 24)[12:]  # the next epoch is reshuffled
    few = WebDatasetImages(make_shards(tmp_path / "one", n_shards=1, per_shard=6), image_size=8)
    a, b = ([next(few.stream(0, r, 2))["caption"] for _ in range(1)] for r in (0, 1))
    assert a != b  # fewer shards than ranks: samples are split instead


def test_webdataset_trains_a_tokenizer_through_the_loop(tmp_path):
    from tokenloom.tokenizers import build
    from tokenloom.training.tokenizer_trainer import TrainConfig, train_tokenizer

    make_shards(tmp_path / "wds", n_shards=2, per_shard=4)
    torch.manual_seed(0)
    tok = build("vq", image_size=8, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=4, norm_groups=4,
                codebook_size=8, codebook_dim=4)
    result = train_tokenizer(tok, WebDatasetImages(str(tmp_path / "wds"), image_size=8),
                             TrainConfig(max_steps=3, batch_size=4, progress=False, log_with="none"))
    assert result.steps == 3


# ---------------------------------------------------------------- Hugging Face rows
def test_hf_rows_become_items_and_bad_columns_are_named():
    rows = [{"img": Image.new("RGB", (9, 9), (255, 255, 255)), "y": 3, "text": "white"},
            {"img": {"bytes": png_bytes((0, 0, 0))}, "y": 1, "text": "black"}]
    ds = HFImageDataset(rows, image_size=8, image_column="img", label_column="y", caption_column="text")
    assert len(ds) == 2 and ds[0]["label"] == 3 and ds[1]["caption"] == "black"
    assert ds[0]["image"].min() == 1.0 and ds[1]["image"].max() == -1.0
    with pytest.raises(ValueError, match="label_column='label' is not a column"):
        HFImageDataset(rows, image_column="img")


def test_hf_datasets_folder_on_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"image": [png_bytes((255, 0, 0))] * 2, "label": [0, 1]})
    data.save_to_disk(str(tmp_path / "hf"))
    ds = build_dataset("hf_datasets", root=str(tmp_path / "hf"), image_size=8)
    assert len(ds) == 2 and ds[1]["label"] == 1


# ---------------------------------------------------------------- per-rank batch plan
def test_ranks_split_each_global_batch_and_resume_without_replay():
    data = torch.utils.data.TensorDataset(torch.arange(20))
    one = batch_stream(data, batch_size=4, seed=3, start_step=0)
    steps = [next(one)[0].tolist() for _ in range(10)]  # 5 steps per epoch, 2 epochs
    assert sorted(sum(steps[:5], [])) == list(range(20)) and steps[:5] != steps[5:]
    ranks = [batch_stream(data, batch_size=4, seed=3, start_step=0, rank=r, world=2) for r in (0, 1)]
    assert [next(ranks[0])[0].tolist() + next(ranks[1])[0].tolist() for _ in range(10)] == steps
    accumulated = batch_stream(data, batch_size=4, seed=3, start_step=0, accumulation=2)
    assert [next(accumulated)[0].tolist() + next(accumulated)[0].tolist() for _ in range(10)] == steps
    resumed = batch_stream(data, batch_size=4, seed=3, start_step=7)
    assert [next(resumed)[0].tolist() for _ in range(3)] == steps[7:]
    with pytest.raises(ValueError, match="fewer than batch_size=32"):
        next(batch_stream(data, batch_size=32, seed=0, start_step=0))


# ---------------------------------------------------------------- token shards
def test_pretokenize_script_round_trip_and_generator_training_from_shards(tmp_path):
    from tokenloom import generators
    from tokenloom.data.token_shards import TokenShardDataset
    from tokenloom.tokenizers import build
    from tokenloom.training.generator_trainer import GeneratorTrainConfig, pretokenize, train_generator

    torch.manual_seed(0)
    tok = build("vq", image_size=16, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4,
                codebook_size=32, codebook_dim=4).eval()
    tok.save_pretrained(tmp_path / "tok")
    script = runpy.run_path(str(ROOT / "scripts" / "pretokenize.py"))["main"]
    summary = script(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "shards"), "data.name=digits",
                      "data.split=test", "data.image_size=16", "--shard-size", "100", "--no-progress"])
    assert summary["num_items"] == 364 and summary["shards"] == 4
    expected = pretokenize(tok, build_dataset("digits", split="test", image_size=16), progress=False)
    for in_memory in (True, False):
        shards = TokenShardDataset(str(tmp_path / "shards"), in_memory=in_memory)
        assert shards.spec == tok.spec and shards.condition == "class" and len(shards) == 364
        for i in (0, 99, 100, 363):
            tokens, label = shards[i]
            assert torch.equal(tokens, expected.tensors[0][i]) and int(label) == int(expected.tensors[1][i])
    gen = generators.build("raster_ar", token_spec=tok.spec.to_dict(), width=16, depth=1, num_heads=2,
                           multiple_of=16, num_classes=10)
    result = train_generator(gen, TokenShardDataset(str(tmp_path / "shards"), in_memory=False),
                             GeneratorTrainConfig(max_steps=2, batch_size=8, progress=False, log_with="none"))
    assert result.steps == 2
    with pytest.raises(ValueError, match="already holds token shards"):
        script(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "shards"), "data.name=digits"])
    with pytest.raises(ValueError, match="not a token-shard folder"):
        TokenShardDataset(str(tmp_path))
    os.remove(tmp_path / "shards" / "index.json")
    with pytest.raises(ValueError, match="unfinished write"):
        TokenShardDataset(str(tmp_path / "shards"))
    np.testing.assert_equal(len(os.listdir(tmp_path / "shards")), 4)


def test_pretokenize_script_with_text_features_from_any_conditioner_folder(tmp_path):
    from pipeline_tiny import tiny_text_conditioner

    from tokenloom.data.token_shards import TokenShardDataset
    from tokenloom.tokenizers import build

    torch.manual_seed(0)
    tok = build("vq", image_size=32, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4,
                codebook_size=32, codebook_dim=4).eval()
    tok.save_pretrained(tmp_path / "tok")
    conditioner = tiny_text_conditioner()
    conditioner.save_pretrained(tmp_path / "cond")
    script = runpy.run_path(str(ROOT / "scripts" / "pretokenize.py"))["main"]
    script(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "shards"), "--condition", "text",
            "--conditioner", str(tmp_path / "cond"), "data.name=shapes", "data.num_samples=6", "--no-progress"])
    shards = TokenShardDataset(str(tmp_path / "shards"))
    data = build_dataset("shapes", num_samples=6)
    want = conditioner.encode([data[i]["caption"] for i in range(6)])
    item = shards[5]
    assert torch.allclose(item[1], want.features[5], atol=1e-6)
    with pytest.raises(ValueError, match="not a registered conditioner class"):
        script(["--tokenizer", str(tmp_path / "tok"), "--output", str(tmp_path / "s2"), "--condition", "text",
                "--conditioner", str(tmp_path / "tok"), "data.name=shapes", "data.num_samples=6"])
