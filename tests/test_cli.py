"""The ``tokenloom`` command line: ``generate`` writes PNGs; ``convert`` fails readably (exit 2, no traceback)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tokenloom.cli import main
from tokenloom.generators.raster_ar import RasterAR
from tokenloom.pipelines.class_to_image import ClassToImagePipeline
from tokenloom.tokenizers.vq import VQTokenizer


@pytest.fixture(scope="module")
def c2i_dir(tmp_path_factory):
    """A tiny class-to-image pipeline folder (as tests/test_pipelines.py builds it)."""
    torch.manual_seed(0)
    vq = VQTokenizer(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, norm_groups=4,
                     codebook_size=16, codebook_dim=4).eval()
    torch.manual_seed(1)
    ar = RasterAR(token_spec=vq.spec.to_dict(), width=32, depth=2, num_heads=2, multiple_of=16, condition="class",
                  num_classes=5).eval()
    for p in ar.output_head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    path = tmp_path_factory.mktemp("c2i")
    ClassToImagePipeline(vq, ar, sampling_defaults={"top_k": 8}).save_pretrained(path)
    return path


def test_generate_writes_a_png(c2i_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--class-label", "1", "-m", str(c2i_dir), "-o", str(out), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    img = Image.open(out)
    assert img.format == "PNG" and img.size[0] >= 8
    again = tmp_path / "again.png"
    assert main(["generate", "--class-label", "1", "-m", str(c2i_dir), "-o", str(again), "--seed", "3"]) == 0
    assert out.read_bytes() == again.read_bytes()  # same seed, same image


def test_generate_one_file_per_image(c2i_dir, tmp_path):
    out = tmp_path / "img.png"
    assert main(["generate", "--class-label", "0", "4", "-m", str(c2i_dir), "-o", str(out)]) == 0
    files = sorted(p.name for p in tmp_path.glob("img_*.png"))
    assert files == ["img_000.png", "img_001.png"]
    assert Image.open(tmp_path / files[0]).size == (8, 8)


def test_generate_bad_class_label_exits_2(c2i_dir, tmp_path, capsys):
    assert main(["generate", "--class-label", "9", "-m", str(c2i_dir), "-o", str(tmp_path / "x.png")]) == 2
    assert "class_labels" in capsys.readouterr().err


@pytest.mark.parametrize("kind,argv", [
    ("llamagen", ["--vq", "{missing}", "--gpt", "{other}"]),
    ("var", ["--vae", "{other}", "--var", "{missing}"]),
    ("mar", ["--vae", "{missing}", "--mar", "{other}"]),
])
def test_convert_missing_file_names_the_path(kind, argv, tmp_path, capsys):
    other = tmp_path / "exists.pt"
    torch.save({}, other)
    missing = tmp_path / "nope" / "missing.pt"
    argv = [a.format(missing=missing, other=other) for a in argv]
    assert main(["convert", kind, *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_convert_missing_config_names_the_path(tmp_path, capsys):
    ckpt = tmp_path / "a.pt"
    torch.save({}, ckpt)
    code = main(["convert", "llamagen", "--vq", str(ckpt), "--gpt", str(ckpt), "--gpt-config",
                 str(tmp_path / "gone.json"), "--out", str(tmp_path / "out")])
    assert code == 2 and "gone.json" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"this is not a checkpoint", None])
@pytest.mark.parametrize("kind,flags", [("llamagen", ("--vq", "--gpt")), ("var", ("--vae", "--var")),
                                        ("mar", ("--vae", "--mar"))])
def test_convert_bad_container_exits_2_with_a_message(kind, flags, content, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    if content is None:
        torch.save([torch.zeros(2)], bad)  # loads with weights_only=True, but is no known container
    else:
        bad.write_bytes(content)
    code = main(["convert", kind, flags[0], str(bad), flags[1], str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"tokenloom convert {kind}: error:") and "Traceback" not in err
    assert str(bad) in err  # the message names the input


def test_convert_unknown_preset_lists_the_presets(tmp_path, capsys):
    ckpt = tmp_path / "a.pt"
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(4, 8)}}, ckpt)
    code = main(["convert", "llamagen", "--vq", str(ckpt), "--gpt", str(ckpt), "--vq-preset", "VQ-99",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "VQ-16" in err


def test_convert_refuses_a_non_empty_out_folder(tmp_path, capsys):
    ckpt = tmp_path / "a.pt"
    torch.save({}, ckpt)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", "var", "--vae", str(ckpt), "--var", str(ckpt), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").exists()


def test_convert_unknown_converter_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "dalle", "--out", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "dalle" in err and "llamagen" in err


@pytest.mark.parametrize("kind,flags", [("llamagen", ["--vq", "--gpt", "--cfg-interval", "--preset"]),
                                        ("var", ["--vae", "--var", "--top-p"]),
                                        ("mar", ["--vae", "--mar", "--num-iter", "--temperature"])])
def test_convert_help(kind, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", kind, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(f in text for f in [*flags, "--out"])
