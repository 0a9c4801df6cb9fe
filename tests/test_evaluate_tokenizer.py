"""scripts/evaluate_tokenizer.py on tiny untrained tokenizer folders and 4 shapes test images.

Checks the table's columns, that every number equals what tokenloom.evaluation.reconstruction's functions give on
the same images, that the training record is read, and FlexTok's prefix table (k = 1, 2, 4).
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tokenloom.data.shapes import ShapesDataset
from tokenloom.evaluation.reconstruction import code_usage, psnr, ssim
from tokenloom.tokenizers import build
from tokenloom.tokens import Tokens

ROOT = Path(__file__).resolve().parents[1]
SIZE, NUM = 16, 4
TINY_CONV = dict(image_size=SIZE, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8, norm_groups=4)


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_tokenizer", ROOT / "scripts" / "evaluate_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    made = {
        "tiny_vq": build("vq", codebook_size=16, codebook_dim=4, **TINY_CONV),
        "tiny_bsq": build("bsq", bits=5, **TINY_CONV),
        "tiny_flextok": build("flextok", image_size=SIZE, patch_size=4, num_tokens=4, fsq_levels=[5, 4, 3],
                              width=32, encoder_depth=1, decoder_depth=1, num_heads=2),
    }
    for name, tok in made.items():
        tok.save_pretrained(str(root / name))
    with open(root / "tiny_vq" / "train_log.json", "w") as f:
        json.dump({"steps": 7, "minutes": 0.5, "cpu_minutes": 0.25, "stopped_by": "steps", "threads": 1}, f)
    (root / "tiny_vq.log").write_text("not a folder\n")
    return root, made


@pytest.fixture(scope="module")
def result(folders):
    root, _ = folders
    script = load_script()
    args = [str(root / n) for n in ("tiny_vq", "tiny_bsq", "tiny_flextok", "tiny_vq.log")]
    out_json = root / "out.json"
    res = script.main(args + ["--num-samples", str(NUM), "--batch-size", "3", "--no-progress", "--json",
                              str(out_json)])
    return script, res, json.loads(out_json.read_text())


def test_table_columns_and_rows(result):
    script, res, _ = result
    text = script.render(res["tokenizers"])
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["tokenizer", "class", "kind", "layout", "vocab", "depth", "bits", "dim", "tokens",
                      "bits/img", "PSNR (dB)", "SSIM", "usage", "perplexity", "train CPU-min", "train steps"]
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:5])}
    assert set(rows) == {"tiny_vq", "tiny_bsq", "tiny_flextok"}  # the .log file is skipped
    col = {name: i for i, name in enumerate(header)}
    vq, bsq, flex = rows["tiny_vq"], rows["tiny_bsq"], rows["tiny_flextok"]
    assert (vq[col["kind"]], vq[col["layout"]], vq[col["vocab"]], vq[col["depth"]], vq[col["tokens"]],
            vq[col["bits/img"]]) == ("index", "grid 8x8", "16", "1", "64", "256")
    assert (bsq[col["kind"]], bsq[col["bits"]], bsq[col["vocab"]], bsq[col["usage"]], bsq[col["bits/img"]]) == \
        ("bits", "5", "-", "-", "320")
    assert (flex[col["layout"]], flex[col["vocab"]], flex[col["tokens"]]) == ("sequence 4", "60", "4")
    assert (vq[col["train CPU-min"]], vq[col["train steps"]]) == ("0.25", "7")
    assert (bsq[col["train CPU-min"]], bsq[col["train steps"]]) == ("-", "-")
    prefix_header = [c.strip() for c in lines[lines.index("PSNR (dB) decoding only the first k tokens:") + 2]
                     .strip("|").split("|")]
    assert prefix_header == ["tokenizer", "k=1", "k=2", "k=4"]


def test_numbers_equal_reconstruction_functions(folders, result):
    _, made = folders
    _, res, saved = result
    data = ShapesDataset(split="test", image_size=SIZE, num_samples=NUM, seed=0)
    images = torch.stack([data[i]["image"] for i in range(NUM)])
    rows = {r["tokenizer"]: r for r in res["tokenizers"]}
    with torch.no_grad():
        for name, tok in made.items():
            tok.eval()
            tokens = tok.encode(images)
            recon = tok.decode(tokens)
            row = rows[name]
            assert row["num_images"] == NUM
            assert row["psnr"] == pytest.approx(float(psnr(recon, images).mean()), abs=1e-4)
            assert row["ssim"] == pytest.approx(float(ssim(recon, images).mean()), abs=1e-5)
            if tokens.spec.kind == "index":
                counts = torch.bincount(tokens.data.flatten(), minlength=tok.spec.vocab_size)
                want = code_usage(counts)
                assert row["codebook_usage"] == pytest.approx(want["codebook_usage"])
                assert row["perplexity"] == pytest.approx(want["perplexity"])
            else:
                assert "codebook_usage" not in row
        flex = made["tiny_flextok"]
        tokens = flex.encode(images)
        assert sorted(rows["tiny_flextok"]["prefix"]) == [1, 2, 4]
        for k in (1, 2, 4):
            recon = flex.decode(Tokens(tokens.data[:, :k], tokens.spec))
            assert rows["tiny_flextok"]["prefix"][k]["psnr"] == pytest.approx(float(psnr(recon, images).mean()),
                                                                             abs=1e-4)
        assert rows["tiny_flextok"]["prefix"][4]["psnr"] == pytest.approx(rows["tiny_flextok"]["psnr"], abs=1e-4)
    assert [r["tokenizer"] for r in saved["tokenizers"]] == ["tiny_vq", "tiny_bsq", "tiny_flextok"]
    assert saved["tokenizers"][0]["psnr"] == pytest.approx(rows["tiny_vq"]["psnr"])


def test_no_folders_is_an_error(tmp_path):
    script = load_script()
    with pytest.raises(SystemExit, match="no tokenizer folders"):
        script.main([str(tmp_path / "missing"), "--no-progress"])
