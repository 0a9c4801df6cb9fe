"""shapes-GenEval: the judge's sanity bars, its rules, and GenEval's folder layout.

Sanity bars use 360 held-out 32×32 images (60 per category) written to and scored from a
GenEval-layout folder, plus 60 images each at 16×16 and 64×64.
"""

import json

import numpy as np
import pytest
from scipy import ndimage

from tokenloom.data.shapes import CATEGORIES, SHAPES, ShapesDataset, render_scene
from tokenloom.evaluation.geneval import (
    format_table,
    geneval_metadata,
    iter_geneval_folder,
    load_image,
    make_prompts,
    read_prompts,
    score_folder,
    summarize,
    write_geneval_sample,
    write_prompts,
)
from tokenloom.evaluation.shapes_judge import detect_objects, judge

N_SANITY = 360


@pytest.fixture(scope="module")
def held_out():
    ds = ShapesDataset("test", image_size=32, num_samples=N_SANITY, seed=0)
    return [geneval_metadata(ds.scene(i)) for i in range(N_SANITY)], [ds.image(i) for i in range(N_SANITY)]


def test_own_captions_score_at_least_099_through_the_layout(held_out, tmp_path):
    metas, images = held_out
    for i, (m, img) in enumerate(zip(metas, images)):
        write_geneval_sample(tmp_path, i, m, [img])
    report = score_folder(tmp_path, progress=False)
    print(f"\nown captions ({N_SANITY} images):\n{format_table(report)}")
    assert set(report["per_category"]) == set(CATEGORIES)
    assert sum(report["num_samples"].values()) == N_SANITY and report["num_prompts"] == N_SANITY
    assert report["overall"] >= 0.99, format_table(report)
    assert min(report["per_category"].values()) >= 0.95, format_table(report)


def test_shuffled_captions_score_well_below_half(held_out):
    metas, images = held_out
    perm = np.random.default_rng(1).permutation(N_SANITY)
    results = [{"tag": metas[j]["tag"], "correct": judge(images[i], metas[j])[0]} for i, j in enumerate(perm)]
    report = summarize(results)
    print(f"\nshuffled captions ({N_SANITY} images):\n{format_table(report)}")
    assert report["overall"] < 0.3, format_table(report)


@pytest.mark.parametrize("size", [16, 64])
def test_own_captions_other_sizes(size):
    ds = ShapesDataset("test", image_size=size, num_samples=60, seed=1)
    correct = [judge(ds.image(i), geneval_metadata(ds.scene(i)))[0] for i in range(60)]
    assert np.mean(correct) >= 0.95


def test_mild_blur_and_noise_still_pass():
    """Generated images are never pixel-exact: a slight blur plus noise must not break detection."""
    ds = ShapesDataset("test", image_size=32, num_samples=60, seed=2)
    rng = np.random.default_rng(0)
    correct = []
    for i in range(60):
        img = ndimage.gaussian_filter(ds.image(i).astype(np.float32), (0.5, 0.5, 0)) + rng.normal(0, 5, (32, 32, 3))
        correct.append(judge(np.clip(np.rint(img), 0, 255).astype(np.uint8), geneval_metadata(ds.scene(i)))[0])
    assert np.mean(correct) >= 0.95


# ----------------------------------------------------------------------------- rules on hand-made scenes
def _obj(shape, color, x, y, size=0.25):
    return {"shape": shape, "color": color, "center": [x, y], "size": size}


def _image(*objs, size=32):
    return render_scene({"objects": list(objs)}, size)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("px", [7, 10, 16, 40])
def test_detects_each_shape_and_color(shape, px):
    size = 64 if px > 20 else 32
    img = _image(_obj(shape, "cyan", 0.47, 0.53, px / size), size=size)
    (d,) = detect_objects(img)
    assert (d.shape, d.color) == (shape, "cyan")


def _counting(shape, n):
    return {"tag": "counting", "include": [{"class": shape, "count": n}],
            "exclude": [{"class": shape, "count": n + 1}], "prompt": f"{n} {shape}s"}


def test_counting_needs_the_exact_number():
    img = _image(_obj("circle", "red", 0.2, 0.2), _obj("circle", "green", 0.7, 0.25), _obj("circle", "blue", 0.5, 0.75))
    assert judge(img, _counting("circle", 3))[0]
    ok2, why2 = judge(img, _counting("circle", 2))
    ok4, why4 = judge(img, _counting("circle", 4))
    assert not ok2 and "circle<3" in why2 and not ok4 and "circle>=4" in why4
    assert not judge(img, _counting("square", 3))[0]


def _position(relation, first="circle", second="square", colors=None):
    a = {"class": second, "count": 1}
    b = {"class": first, "count": 1, "position": [relation, 0]}
    if colors:
        b["color"], a["color"] = colors
    return {"tag": "position", "include": [a, b], "prompt": f"a {first} {relation} a {second}"}


def test_position_relation_and_its_swap():
    img = _image(_obj("circle", "red", 0.2, 0.45), _obj("square", "blue", 0.75, 0.55))  # circle left of square
    assert judge(img, _position("left of"))[0]
    for wrong in ("right of", "above", "below"):
        assert not judge(img, _position(wrong))[0]
    assert not judge(img, _position("left of", first="square", second="circle"))[0]  # swapped roles
    assert judge(img, _position("left of", colors=("red", "blue")))[0]
    assert not judge(img, _position("left of", colors=("blue", "red")))[0]
    # a small horizontal offset within the margin is not "left of"; the vertical relation holds
    stacked = _image(_obj("circle", "red", 0.45, 0.2), _obj("square", "blue", 0.5, 0.75))
    assert not judge(stacked, _position("left of"))[0] and judge(stacked, _position("above"))[0]
    # GenEval's rule: a clear diagonal offset is both "left of" and "above"
    diag = _image(_obj("circle", "red", 0.25, 0.25), _obj("square", "blue", 0.72, 0.72))
    assert judge(diag, _position("left of"))[0] and judge(diag, _position("above"))[0]
    assert not judge(diag, _position("right of"))[0]


def test_color_attr_needs_each_shape_in_its_own_color():
    img = _image(_obj("square", "red", 0.25, 0.5), _obj("triangle", "blue", 0.75, 0.5))
    meta = {"tag": "color_attr", "prompt": "", "include": [
        {"class": "square", "count": 1, "color": "red"}, {"class": "triangle", "count": 1, "color": "blue"}]}
    swapped = json.loads(json.dumps(meta))
    swapped["include"][0]["color"], swapped["include"][1]["color"] = "blue", "red"
    assert judge(img, meta)[0] and not judge(img, swapped)[0]
    single = {"tag": "colors", "prompt": "", "include": [{"class": "triangle", "count": 1, "color": "yellow"}]}
    assert not judge(img, single)[0]


def test_empty_image_and_specks_have_no_objects():
    img = np.zeros((32, 32, 3), np.uint8)
    img[3:5, 3:5] = 255  # 4 px: below the minimum area
    assert detect_objects(img) == []
    assert not judge(img, {"tag": "single_object", "prompt": "", "include": [{"class": "circle", "count": 1}]})[0]
    with pytest.raises(ValueError, match="image"):
        detect_objects(img.astype(np.float32))


# ----------------------------------------------------------------------------- layout and prompt file
def test_layout_round_trip(tmp_path):
    meta = _counting("triangle", 2)
    imgs = [np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in range(3)]
    folder = write_geneval_sample(tmp_path, 7, meta, imgs)
    assert folder.name == "00007" and (folder / "samples" / "0002.png").exists()
    assert (folder / "metadata.jsonl").read_text().count("\n") == 1
    ((index, got_meta, paths),) = list(iter_geneval_folder(tmp_path))
    assert index == 7 and got_meta == meta and [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    assert all(np.array_equal(load_image(p), im) for p, im in zip(paths, imgs))
    with pytest.raises(ValueError, match="images"):
        write_geneval_sample(tmp_path, 8, meta, [imgs[0].astype(np.float32)])
    with pytest.raises(ValueError, match="metadata"):
        write_geneval_sample(tmp_path, 8, {"prompt": "x"}, imgs)
    with pytest.raises(ValueError, match="index"):
        write_geneval_sample(tmp_path, -1, meta, imgs)


def test_prompt_file_from_held_out_split(tmp_path):
    prompts = make_prompts(num_per_category=5, seed=0)
    assert [p["tag"] for p in prompts] == [c for c in CATEGORIES for _ in range(5)]
    assert prompts == make_prompts(num_per_category=5, seed=0)
    path = write_prompts(tmp_path / "p.jsonl", prompts)
    assert read_prompts(path) == prompts
    assert all(set(p) <= {"tag", "include", "exclude", "prompt"} for p in prompts)
    assert prompts != make_prompts(num_per_category=5, seed=1)
    with pytest.raises(ValueError, match="num_per_category"):
        make_prompts(num_per_category=0)


def test_table_lists_every_category_and_overall():
    results = [{"tag": t, "correct": i % 2 == 0} for i, t in enumerate(CATEGORIES * 2)]
    report = summarize(results)
    table = format_table(report)
    assert all(t in table for t in CATEGORIES) and "overall" in table
    assert report["overall"] == pytest.approx(0.5)
