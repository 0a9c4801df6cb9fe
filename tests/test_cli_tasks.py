"""``tokenloom generate|reconstruct|inpaint`` on tiny folders, and the train/evaluate/bench front doors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_tiny import components, tiny_generator, tiny_vq

from tokenloom.cli import main
from tokenloom.pipelines.class_to_image import ClassToImagePipeline
from tokenloom.pipelines.inpainting import InpaintingPipeline
from tokenloom.pipelines.unconditional import UnconditionalImagePipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok, gen, _ = components("random_order")
    ClassToImagePipeline(tok, gen).save_pretrained(root / "c2i")
    vq = tiny_vq()
    UnconditionalImagePipeline(vq, tiny_generator("random_order", vq.spec, "none")).save_pretrained(root / "uncond")
    ClassToImagePipeline(vq, tiny_generator("raster", vq.spec)).save_pretrained(root / "raster")
    img = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(root / "img.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(root / "mask.png")
    (root / "not_an_image.png").write_text("hello")
    return root


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_every_command_has_help(capsys):
    for command in ("generate", "reconstruct", "inpaint", "convert"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        assert f"usage: tokenloom {command}" in capsys.readouterr().out
    for command in ("train", "evaluate", "bench"):
        assert main([command, "--help"]) == 0
        assert f"usage: tokenloom {command} NAME" in capsys.readouterr().out


def test_generate_dispatches_on_the_folders_task(folders, tmp_path, capsys):
    assert main(["generate", "-m", str(folders / "uncond"), "-n", "4", "--grid", "-o", str(tmp_path / "u.png"),
                 "--no-progress"]) == 0
    assert png(tmp_path / "u.png").shape == (2 + 2 * 10, 2 + 2 * 10, 3)  # 2x2 grid of 8x8 with padding 2
    code = main(["generate", "a red circle", "-m", str(folders / "c2i"), "-o", str(tmp_path / "x.png")])
    assert code == 2 and "class-conditional: give --class-label" in capsys.readouterr().err


def test_reconstruct_writes_the_decoded_image(folders, tmp_path, capsys):
    out = tmp_path / "rec.png"
    assert main(["reconstruct", str(folders / "img.png"), "-m", str(folders / "c2i"), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    from tokenloom.pipelines.reconstruction import ImageReconstructionPipeline

    pipe = ImageReconstructionPipeline(tiny_vq())
    expected = np.asarray(pipe(Image.open(folders / "img.png")).images[0])
    assert np.abs(png(out).astype(int) - expected.astype(int)).max() <= 1


def test_reconstruct_resizes_a_larger_image_and_says_so(folders, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.open(folders / "img.png").resize((32, 32)).save(big)
    assert main(["reconstruct", str(big), "-m", str(folders / "c2i"), "-o", str(tmp_path / "r.png")]) == 0
    assert "resized from 32x32 to the model's 8x8" in capsys.readouterr().err
    assert png(tmp_path / "r.png").shape == (8, 8, 3)


def test_inpaint_keeps_tokens_and_matches_the_pipeline(folders, tmp_path):
    out = tmp_path / "inp.png"
    argv = ["inpaint", str(folders / "img.png"), "--mask", str(folders / "mask.png"), "--class-label", "2",
            "-m", str(folders / "c2i"), "-o", str(out), "--seed", "5", "--no-progress"]
    assert main(argv) == 0
    pipe = InpaintingPipeline.from_pipe(ClassToImagePipeline.from_pretrained(str(folders / "c2i")))
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(Image.open(folders / "img.png"), Image.open(folders / "mask.png"), class_labels=2,
               generator=torch.Generator().manual_seed(5))
    assert np.abs(png(out).astype(int) - np.asarray(ref.images[0]).astype(int)).max() <= 1
    again = tmp_path / "again.png"
    assert main(argv[:-5] + ["-o", str(again), "--seed", "5", "--no-progress"]) == 0
    assert out.read_bytes() == again.read_bytes()


@pytest.mark.parametrize("case,expected", [
    ("missing", "IMG: no such file"),
    ("not_image", "cannot read"),
    ("mask_size", "--mask must have the size of IMG"),
    ("raster", "RasterAR cannot do 'image-inpainting'"),
    ("no_label", "class_labels is required"),
    ("not_folder", "is not a pipeline folder"),
])
def test_inpaint_user_errors_are_one_line_without_traceback(folders, tmp_path, capsys, case, expected):
    img, mask, model = folders / "img.png", folders / "mask.png", folders / "c2i"
    extra = ["--class-label", "1"]
    if case == "missing":
        img = tmp_path / "nope.png"
    elif case == "not_image":
        img = folders / "not_an_image.png"
    elif case == "mask_size":
        mask = tmp_path / "small_mask.png"
        Image.new("L", (4, 4)).save(mask)
    elif case == "raster":
        model = folders / "raster"
    elif case == "no_label":
        extra = []
    elif case == "not_folder":
        model = tmp_path
    code = main(["inpaint", str(img), "--mask", str(mask), "-m", str(model), "-o", str(tmp_path / "o.png"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tokenloom inpaint: error:")  # after diffusers' loading bar


# ---------------------------------------------------------------- front doors
ECHO = "import json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit(3 if '--fail' in sys.argv else 0)\n"


def test_train_and_evaluate_forward_argv_verbatim(tmp_path, monkeypatch, capfd):
    (tmp_path / "train_echo.py").write_text(ECHO)
    (tmp_path / "evaluate_echo.py").write_text(ECHO)
    monkeypatch.setenv("TOKENLOOM_SCRIPTS_DIR", str(tmp_path))
    args = ["--config", "configs/x.yaml", "train.max_steps=5", "--help", "-o", "a b"]
    assert main(["train", "echo", *args]) == 0
    assert json.loads(capfd.readouterr().out) == args
    assert main(["evaluate", "echo", "--fail"]) == 3  # the script's exit status comes back


def test_bench_runs_benchmarks_as_modules_from_any_directory(tmp_path, monkeypatch, capfd):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "__init__.py").write_text("")
    (bench / "echo.py").write_text(ECHO)
    monkeypatch.setenv("TOKENLOOM_BENCHMARKS_DIR", str(bench))
    monkeypatch.chdir(tmp_path.parent)
    assert main(["bench", "echo", "--json", "out.json"]) == 0
    assert json.loads(capfd.readouterr().out) == ["--json", "out.json"]


def test_unknown_front_door_name_lists_the_available_ones(capsys):
    assert main(["evaluate", "fdi"]) == 2
    err = capsys.readouterr().err
    assert "unknown NAME 'fdi'" in err and "did you mean 'fid'" in err and "geneval" in err
    assert main(["train"]) == 2


@pytest.mark.slow  # a fresh interpreter importing the training stack: seconds alone, minutes on a loaded machine
def test_real_script_help_through_the_installed_command():
    """The console script itself, on a real script: ``tokenloom train generator --help``."""
    exe = [sys.executable, "-m", "tokenloom.cli"]
    done = subprocess.run([*exe, "train", "generator", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage" in done.stdout and "--config" in done.stdout
