"""The built-in procedural "shapes" data set: compositional scenes with true captions.

Images are RGB squares, ``image_size`` × ``image_size`` (32 by default, 16..256 allowed), with a
black background and 1 to 4 non-overlapping objects: a ``circle``, ``square`` or ``triangle``
(upright, apex at the top) in one of seven saturated colours (red, green, blue, yellow, magenta,
cyan, white). Objects are at least ~7 px across at 32×32 (sizes and positions are fractions of
the image, so they scale with ``image_size``), placed at continuous positions, with a gap of
about 2.5 px at 32×32 between their bounding boxes. Edges are anti-aliased by 4×4 supersampling.

Every scene is generated *for* one of GenEval's six categories (single_object, two_object,
counting, colors, position, color_attr), so its caption is true of its image. A scene is fully
determined by ``(seed, split, index)``: its random stream is ``np.random.default_rng([seed,
offset + index])`` and rendering is plain numpy, so every machine gives the same image and
caption. The scene itself does not depend on ``image_size``; only its rendering does.

Splits are disjoint index ranges: ``"train"`` uses indices ``[0, 10**9)``, ``"test"``
(held out) uses ``[10**9, 2·10**9)``.

Dataset items: ``{"image": float32 [3, H, W] in [-1, 1], "caption": str, "label": int}`` where
``label`` is the index of the scene's category in :data:`CATEGORIES` (for
:class:`SingleShapeDataset`, the shape×colour class). ``metadata(i)`` gives the structured scene.

Scene dict (what :func:`sample_scene` returns and :func:`render_scene` draws)::

    {"category": str, "caption": str,
     "objects": [{"shape": str, "color": str, "center": [x, y], "size": s}, ...],
     "include": [...], "exclude": [...]}   # GenEval's requirement fields (see below)

``center`` is in fractions of width/height (x to the right, y down), ``size`` is the object's
bounding-box side as a fraction of the image side. ``include``/``exclude`` mirror GenEval's
metadata: ``{"class": shape, "count": n}`` plus ``"color"`` where the caption names a colour and,
for position, ``include[1]["position"] = [relation, 0]`` ("include[1] is <relation> include[0]").
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

SPLIT_OFFSETS: dict[str, int] = {"train": 0, "test": 10**9}
MAX_SAMPLES = 10**9
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 256

MIN_SIZE = 0.22  # ≈ 7 px at 32×32
MAX_SIZE_BY_COUNT = {1: 0.5, 2: 0.36, 3: 0.3, 4: 0.27}
GAP = 0.08  # between bounding boxes, ≈ 2.5 px at 32×32
BORDER = 0.03  # between a bounding box and the image edge
POSITION_THRESHOLD = 0.1  # GenEval's: each box's extent shrinks the centre offset by this fraction
SUPERSAMPLE = 4

_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ")
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}


# ----------------------------------------------------------------------------- geometry
def object_box(obj: dict) -> tuple[float, float, float, float]:
    """Bounding box ``(x0, y0, x1, y1)`` of a scene object, in fractions of the image side."""
    (cx, cy), h = obj["center"], obj["size"] / 2
    return (cx - h, cy - h, cx + h, cy + h)


def relative_position(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box A to box B ("left of", "right of", "above", "below"), GenEval's rule.

    Boxes are ``(x0, y0, x1, y1)`` with y down. The centre offset A−B is shrunk towards zero on
    each axis by ``threshold`` × (sum of both boxes' extents on that axis); a relation holds when
    the shrunk offset, divided by the length of the unshrunk offset, exceeds 0.5 on that axis.
    Boxes whose shrunk offset vanishes have no relation.
    """
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    centre_a, centre_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    extent = (a[2:] - a[:2]) + (b[2:] - b[:2])
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - threshold * extent, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-6):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _place(rng: np.random.Generator, sizes: list[float], max_tries: int = 200) -> list[tuple[float, float]]:
    """Centres for boxes of the given sizes, inside the image and ``GAP`` apart (rejection sampling)."""
    centres: list[tuple[float, float]] = []
    for s in sizes:
        lo, hi = s / 2 + BORDER, 1 - s / 2 - BORDER
        for _ in range(max_tries):
            c = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
            if all(
                abs(c[0] - p[0]) >= (s + q) / 2 + GAP or abs(c[1] - p[1]) >= (s + q) / 2 + GAP
                for p, q in zip(centres, sizes)
            ):
                centres.append(c)
                break
        else:
            return []
    return centres


def _objects(rng: np.random.Generator, shapes: list[str], colors: list[str]) -> list[dict]:
    """Objects with the given shapes and colours at random non-overlapping places and sizes."""
    n = len(shapes)
    while True:  # a retry draws new sizes; 4 objects of at most 0.27 always fit eventually
        sizes = [float(rng.uniform(MIN_SIZE, MAX_SIZE_BY_COUNT[n])) for _ in range(n)]
        centres = _place(rng, sizes)
        if centres:
            return [
                {"shape": sh, "color": co, "center": [cx, cy], "size": s}
                for sh, co, (cx, cy), s in zip(shapes, colors, centres, sizes)
            ]


# ----------------------------------------------------------------------------- captions
def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape: str) -> str:
    return shape + "s"


def _noun_phrase(rng: np.random.Generator, shape: str, color: str | None = None) -> str:
    """'a red circle' / 'one red circle' / 'red circle' (no colour when ``color`` is None)."""
    noun = f"{color} {shape}" if color else shape
    return (_a(noun), "one " + noun, noun)[int(rng.integers(3))]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, category: str) -> dict:
    """A random scene (objects, caption, GenEval requirement) whose caption is true of it.

    ``rng``: a ``numpy.random.Generator``; ``category``: one of :data:`CATEGORIES`.
    """
    if category not in CATEGORIES:
        raise ValueError(f"category={category!r} is not one of {CATEGORIES}")
    prefix = _pick(rng, _PREFIXES)
    shape_ids = rng.permutation(len(SHAPES))
    color_ids = rng.permutation(len(COLOR_NAMES))
    shape_a, shape_b = SHAPES[shape_ids[0]], SHAPES[shape_ids[1]]
    color_a, color_b = COLOR_NAMES[color_ids[0]], COLOR_NAMES[color_ids[1]]
    exclude: list[dict] = []

    if category == "single_object":
        objects = _objects(rng, [shape_a], [color_a])
        body = _pick(rng, (_a(shape_a), "one " + shape_a, shape_a, "a single " + shape_a))
        include = [{"class": shape_a, "count": 1}]
    elif category == "colors":
        objects = _objects(rng, [shape_a], [color_a])
        body = _pick(
            rng, (_noun_phrase(rng, shape_a, color_a), f"{_a(shape_a)} that is {color_a}")
        )
        include = [{"class": shape_a, "count": 1, "color": color_a}]
    elif category == "two_object":
        random_colors = [_pick(rng, COLOR_NAMES) for _ in range(2)]
        objects = _objects(rng, [shape_a, shape_b], random_colors)
        body = f"{_noun_phrase(rng, shape_a)} and {_noun_phrase(rng, shape_b)}"
        include = [{"class": shape_a, "count": 1}, {"class": shape_b, "count": 1}]
    elif category == "color_attr":
        objects = _objects(rng, [shape_a, shape_b], [color_a, color_b])
        body = f"{_noun_phrase(rng, shape_a, color_a)} and {_noun_phrase(rng, shape_b, color_b)}"
        include = [
            {"class": shape_a, "count": 1, "color": color_a},
            {"class": shape_b, "count": 1, "color": color_b},
        ]
    elif category == "counting":
        n = int(rng.integers(1, 5))
        objects = _objects(rng, [shape_a] * n, [_pick(rng, COLOR_NAMES) for _ in range(n)])
        if n == 1:
            body = _pick(rng, (_a(shape_a), "one " + shape_a, "exactly one " + shape_a))
        else:
            number = _pick(rng, (_NUMBER_WORDS[n], _NUMBER_WORDS[n], str(n), "exactly " + _NUMBER_WORDS[n]))
            body = f"{number} {_plural(shape_a)}"
        include = [{"class": shape_a, "count": n}]
        exclude = [{"class": shape_a, "count": n + 1}]
    else:  # position: "<B> <relation> <A>", i.e. include[1] is <relation> include[0]
        relation = _pick(rng, RELATIONS)
        with_color = bool(rng.integers(2))
        while True:
            objects = _objects(rng, [shape_a, shape_b], [color_a, color_b])
            box_a, box_b = object_box(objects[0]), object_box(objects[1])
            # clear with margin: holds as GenEval judges it and with twice its threshold
            if relative_position(box_b, box_a) == {relation} == relative_position(
                box_b, box_a, 2 * POSITION_THRESHOLD
            ):
                break
        phrase_b = _noun_phrase(rng, shape_b, color_b if with_color else None)
        phrase_a = _a(f"{color_a} {shape_a}" if with_color else shape_a)
        body = f"{phrase_b} {_pick(rng, RELATION_PHRASES[relation])} {phrase_a}"
        req_a = {"class": shape_a, "count": 1}
        req_b = {"class": shape_b, "count": 1, "position": [relation, 0]}
        if with_color:
            req_a["color"], req_b["color"] = color_a, color_b
        include = [req_a, req_b]

    scene = {"category": category, "caption": prefix + body, "objects": objects, "include": include}
    if exclude:
        scene["exclude"] = exclude
    return scene


def shape_coverage(
    shape: str, cx: float, cy: float, size: float, x0: int, y0: int, x1: int, y1: int,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Fraction of each pixel of the window ``[y0:y1, x0:x1]`` covered by a shape: float32 ``[h, w]``.

    The shape's bounding box is ``size`` px square, centred at ``(cx, cy)`` px (pixel ``(i, j)``
    spans ``[j, j+1) × [i, i+1)``); coverage is the mean over ``supersample``² points per pixel.
    """
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
    sub = (np.arange(supersample) + 0.5) / supersample
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(1, -1)  # [1, w*ss]
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1, 1)  # [h*ss, 1]
    half = size / 2
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= half * half
    elif shape == "square":
        inside = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # triangle: apex at top centre, base at the bottom; width grows with y
        t = (dy + half) / (2 * half)
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * half)
    inside = inside.astype(np.float32)  # [h*ss, w*ss]
    return inside.reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))


def _check_image_size(image_size) -> None:
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size!r} must be an int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}]"
        )


def render_scene(scene: dict, image_size: int = 32) -> np.ndarray:
    """Draw a scene: uint8 ``[image_size, image_size, 3]``, black background, anti-aliased edges."""
    _check_image_size(image_size)
    canvas = np.zeros((image_size, image_size, 3), dtype=np.float32)
    for obj in scene["objects"]:
        if obj["color"] not in COLORS:
            raise ValueError(f"color={obj['color']!r} is not one of {COLOR_NAMES}")
        cx, cy, size = obj["center"][0] * image_size, obj["center"][1] * image_size, obj["size"] * image_size
        x0, x1 = max(int(np.floor(cx - size / 2)), 0), min(int(np.ceil(cx + size / 2)), image_size)
        y0, y1 = max(int(np.floor(cy - size / 2)), 0), min(int(np.ceil(cy + size / 2)), image_size)
        cov = shape_coverage(obj["shape"], cx, cy, size, x0, y0, x1, y1)[..., None]  # [h, w, 1]
        color = np.asarray(COLORS[obj["color"]], dtype=np.float32)
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - cov) + color * cov
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` → float32 ``[3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------- datasets
def _check_common(split, image_size, num_samples, seed) -> None:
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split={split!r} is not one of {tuple(SPLIT_OFFSETS)}")
    _check_image_size(image_size)
    if not isinstance(num_samples, int) or not 0 < num_samples <= MAX_SAMPLES:
        raise ValueError(f"num_samples={num_samples!r} must be an int in [1, {MAX_SAMPLES}]")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r} must be a non-negative int")


class _IndexedScenes(Dataset):
    """Shared indexing: item ``i`` of a split draws from ``default_rng([seed, offset + i, stream])``."""

    _stream = 0

    def __init__(self, split: str, image_size: int, num_samples: int, seed: int):
        _check_common(split, image_size, num_samples, seed)
        self.split, self.image_size, self.num_samples, self.seed = split, image_size, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, index: int) -> np.random.Generator:
        if not isinstance(index, (int, np.integer)) or not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index={index!r} out of range for {self.num_samples} samples")
        index = int(index) % self.num_samples
        return np.random.default_rng([self.seed, SPLIT_OFFSETS[self.split] + index, self._stream])

    def scene(self, index: int) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def metadata(self, index: int) -> dict:
        """The structured scene of item ``index`` plus its split/index/seed."""
        return dict(self.scene(index), split=self.split, index=int(index) % self.num_samples, seed=self.seed)

    def image(self, index: int) -> np.ndarray:
        """uint8 ``[H, W, 3]`` rendering of item ``index``."""
        return render_scene(self.scene(index), self.image_size)


class ShapesDataset(_IndexedScenes):
    """Compositional shapes scenes with GenEval-category captions (see the module docstring).

    Items: ``{"image": float32 [3, H, W] in [-1, 1], "caption": str, "label": int}``, ``label`` =
    index of the scene's category in :data:`CATEGORIES`. ``categories`` restricts the categories
    drawn (default: all six, uniformly).
    """

    def __init__(
        self,
        split: str = "train",
        image_size: int = 32,
        num_samples: int = 10000,
        seed: int = 0,
        categories: list[str] | tuple[str, ...] | None = None,
    ):
        super().__init__(split, image_size, num_samples, seed)
        categories = tuple(CATEGORIES if categories is None else categories)
        bad = [c for c in categories if c not in CATEGORIES]
        if not categories or bad:
            raise ValueError(f"categories={categories!r} must be a non-empty subset of {CATEGORIES}")
        self.categories = categories
        self.num_classes = len(CATEGORIES)
        self.class_names = list(CATEGORIES)

    def scene(self, index: int) -> dict:
        rng = self._rng(index)
        return sample_scene(rng, self.categories[int(rng.integers(len(self.categories)))])

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {
            "image": image_to_tensor(render_scene(scene, self.image_size)),
            "caption": scene["caption"],
            "label": CATEGORIES.index(scene["category"]),
        }


class SingleShapeDataset(_IndexedScenes):
    """Exactly one object per image; a class-conditional data set with 21 classes.

    Items: ``{"image": float32 [3, H, W] in [-1, 1], "caption": "a red circle", "label": int}``
    with ``label = shape_index * len(COLOR_NAMES) + color_index``; ``class_names[label]`` is
    e.g. ``"red circle"``. Size and position vary as in :class:`ShapesDataset`.
    """

    _stream = 1

    def __init__(self, split: str = "train", image_size: int = 32, num_samples: int = 10000, seed: int = 0):
        super().__init__(split, image_size, num_samples, seed)
        self.num_classes = len(SHAPES) * len(COLOR_NAMES)
        self.class_names = [f"{c} {s}" for s in SHAPES for c in COLOR_NAMES]

    def scene(self, index: int) -> dict:
        rng = self._rng(index)
        label = int(rng.integers(self.num_classes))
        shape, color = SHAPES[label // len(COLOR_NAMES)], COLOR_NAMES[label % len(COLOR_NAMES)]
        return {
            "category": "colors",
            "caption": _a(f"{color} {shape}"),
            "objects": _objects(rng, [shape], [color]),
            "include": [{"class": shape, "count": 1, "color": color}],
            "label": label,
        }

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        return {
            "image": image_to_tensor(render_scene(scene, self.image_size)),
            "caption": scene["caption"],
            "label": scene["label"],
        }
