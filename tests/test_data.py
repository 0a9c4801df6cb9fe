"""Built-in data sets: procedural shapes (ShapesDataset, SingleShapeDataset) and sklearn digits."""

import hashlib
import re

import numpy as np
import pytest
import torch
from scipy import ndimage

from tokenloom.data.digits import DigitsDataset
from tokenloom.data.shapes import (
    CATEGORIES,
    COLOR_NAMES,
    COLORS,
    GAP,
    RELATION_PHRASES,
    SHAPES,
    ShapesDataset,
    SingleShapeDataset,
    object_box,
    relative_position,
    render_scene,
    sample_scene,
)

N = 120  # scenes checked per property test


@pytest.fixture(scope="module")
def train():
    return ShapesDataset("train", image_size=32, num_samples=N, seed=0)


def test_same_seed_and_index_same_item():
    a, b = ShapesDataset(num_samples=50, seed=3), ShapesDataset(num_samples=50, seed=3)
    for i in (0, 7, 49):
        assert a[i]["caption"] == b[i]["caption"]
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert a.metadata(i) == b.metadata(i)
    other = ShapesDataset(num_samples=50, seed=4)
    assert [a[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]


def test_item_does_not_depend_on_dataset_length_or_image_size():
    short, long = ShapesDataset(num_samples=5), ShapesDataset(num_samples=5000, image_size=64)
    assert [short.metadata(i)["objects"] for i in range(5)] == [long.metadata(i)["objects"] for i in range(5)]


def test_golden_hash_is_machine_independent():
    """Pins the generator: a change here means every stored data set and prompt file changes."""
    ds = ShapesDataset(num_samples=8, seed=0)
    h = hashlib.sha256()
    for i in range(8):
        h.update(ds.image(i).tobytes())
        h.update(ds[i]["caption"].encode())
    assert h.hexdigest()[:16] == GOLDEN


GOLDEN = "857e7980fef9a871"


def test_splits_are_disjoint():
    tr = ShapesDataset("train", num_samples=200)
    te = ShapesDataset("test", num_samples=200)
    train_imgs = {tr.image(i).tobytes() for i in range(200)}
    assert not train_imgs & {te.image(i).tobytes() for i in range(200)}
    assert len(train_imgs) == 200  # continuous positions: no repeats either


def test_item_shapes_dtypes_ranges(train):
    for i in range(10):
        item = train[i]
        img = item["image"]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert img.min() == -1.0 and img.max() <= 1.0 and img.max() > 0.9
        assert isinstance(item["caption"], str) and item["caption"]
        assert item["label"] == CATEGORIES.index(train.metadata(i)["category"])


def test_all_categories_appear_and_restriction_works(train):
    assert {train.metadata(i)["category"] for i in range(N)} == set(CATEGORIES)
    only = ShapesDataset(num_samples=30, categories=["counting", "position"])
    assert {only.metadata(i)["category"] for i in range(30)} == {"counting", "position"}


def test_objects_count_size_inside_and_apart(train):
    counts = set()
    for i in range(N):
        objs = train.metadata(i)["objects"]
        counts.add(len(objs))
        boxes = [object_box(o) for o in objs]
        for o, b in zip(objs, boxes):
            assert o["size"] * 32 >= 7 and 0 <= b[0] and b[2] <= 1 and 0 <= b[1] and b[3] <= 1
        for j in range(len(boxes)):
            for k in range(j):
                a, b = boxes[j], boxes[k]
                gap = max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])
                assert gap >= GAP - 1e-9
        # rendered: one connected foreground blob per object, each with the object's colour at its centre
        img = train.image(i)
        _, n_blobs = ndimage.label(img.max(axis=2) > 100, structure=np.ones((3, 3)))
        assert n_blobs == len(objs)
        for o in objs:
            x, y = (int(c * 32) for c in o["center"])
            assert tuple(img[y, x]) == COLORS[o["color"]]
    assert counts == {1, 2, 3, 4}


def _count_in_caption(caption: str) -> int:
    words = {"one": 1, "a": 1, "an": 1, "single": 1, "two": 2, "three": 3, "four": 4}
    for tok in caption.split():
        if tok.isdigit():
            return int(tok)
        if tok in ("two", "three", "four"):
            return words[tok]
    return 1


def test_captions_match_scenes_per_category(train):
    for i in range(N):
        m = train.metadata(i)
        cap, objs, cat = m["caption"], m["objects"], m["category"]
        shapes_in_caption = re.findall(r"(circle|square|triangle)", cap)
        colors_in_caption = re.findall(r"\b(" + "|".join(COLOR_NAMES) + r")\b", cap)
        for req in m["include"]:  # every required object is in the scene
            matching = [o for o in objs if o["shape"] == req["class"] and o["color"] == req.get("color", o["color"])]
            assert len(matching) >= req["count"], (cap, objs)
        if cat == "single_object":
            assert len(objs) == 1 and shapes_in_caption == [objs[0]["shape"]] and not colors_in_caption
        elif cat == "colors":
            assert len(objs) == 1 and shapes_in_caption == [objs[0]["shape"]]
            assert colors_in_caption == [objs[0]["color"]]
        elif cat == "two_object":
            assert sorted(shapes_in_caption) == sorted(o["shape"] for o in objs) and len(set(shapes_in_caption)) == 2
        elif cat == "color_attr":
            assert [(s, c) for s, c in zip(shapes_in_caption, colors_in_caption)] == [
                (o["shape"], o["color"]) for o in objs
            ]
        elif cat == "counting":
            n = _count_in_caption(cap)
            assert len(objs) == n and {o["shape"] for o in objs} == {shapes_in_caption[0]}
            assert m["exclude"] == [{"class": objs[0]["shape"], "count": n + 1}]
        elif cat == "position":
            relation, target = m["include"][1]["position"]
            assert target == 0 and any(f" {p} " in cap for p in RELATION_PHRASES[relation])
            first, second = objs[1], objs[0]  # caption order: "<include[1]> <relation> <include[0]>"
            assert shapes_in_caption == [first["shape"], second["shape"]]
            assert relative_position(object_box(first), object_box(second)) == {relation}


def test_phrasings_vary():
    ds = ShapesDataset(num_samples=300, categories=["colors"])
    caps = [ds[i]["caption"] for i in range(300)]
    assert any(c.startswith("an image of ") for c in caps) and any(c.startswith("one ") for c in caps)
    assert any(re.match(r"^(red|green|blue|yellow|magenta|cyan|white) ", c) for c in caps)


@pytest.mark.parametrize("size", [16, 64])
def test_other_sizes_render(size):
    ds = ShapesDataset(image_size=size, num_samples=4)
    for i in range(4):
        img = ds[i]["image"]
        assert img.shape == (3, size, size) and -1 <= img.min() and img.max() <= 1 and img.max() > 0.9


def test_render_and_sample_scene_api():
    scene = sample_scene(np.random.default_rng(0), "position")
    img = render_scene(scene, 48)
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    scene = {"category": "colors", "caption": "a red square",
             "objects": [{"shape": "square", "color": "red", "center": [0.5, 0.5], "size": 0.5}]}
    img = render_scene(scene, 32)
    assert (img[8:24, 8:24] == [255, 0, 0]).all() and (img[:7] == 0).all()


def test_single_shape_dataset():
    ds = SingleShapeDataset("train", image_size=32, num_samples=400, seed=0)
    assert ds.num_classes == 21 == len(ds.class_names) and ds.class_names[0] == "red circle"
    labels = set()
    for i in range(100):
        item, m = ds[i], ds.metadata(i)
        (obj,) = m["objects"]
        lab = SHAPES.index(obj["shape"]) * len(COLOR_NAMES) + COLOR_NAMES.index(obj["color"])
        assert item["label"] == lab and item["caption"] == "a " + ds.class_names[lab]
        labels.add(lab)
    assert len(labels) >= 19
    te = SingleShapeDataset("test", num_samples=50)
    assert not {ds.image(i).tobytes() for i in range(50)} & {te.image(i).tobytes() for i in range(50)}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"split": "val"}, "split"),
        ({"image_size": 8}, "image_size"),
        ({"image_size": 512}, "image_size"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"categories": ["spiral"]}, "categories"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ShapesDataset(**kwargs)
    if name != "categories":
        with pytest.raises(ValueError, match=name):
            SingleShapeDataset(**kwargs)
    with pytest.raises(ValueError, match="category"):
        sample_scene(np.random.default_rng(0), "spiral")


def test_digits_splits_and_range():
    tr, te = DigitsDataset("train"), DigitsDataset("test", image_size=32)
    assert len(tr) + len(te) == 1797 and len(te) == 364
    assert tr.num_classes == 10
    item = te[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["caption"] == f"the digit {item['label']}"
    assert torch.equal(item["image"][0], item["image"][2])
    assert tr.images.min() == -1.0 and tr.images.max() == 1.0
    assert sorted(torch.bincount(te.labels).tolist())[0] >= 35  # stratified: every class ~20%
    # disjoint: no test image equals a train image at native resolution
    tr8, te8 = DigitsDataset("train", image_size=8), DigitsDataset("test", image_size=8)
    train_set = {bytes(x.numpy().tobytes()) for x in tr8.images}
    assert sum(bytes(x.numpy().tobytes()) in train_set for x in te8.images) == 0
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("val")
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataset(image_size=4)
