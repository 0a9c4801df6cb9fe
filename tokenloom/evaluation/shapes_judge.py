"""shapes-GenEval judge: finds coloured shapes in an image and checks a GenEval requirement.

Detection (:func:`detect_objects`), for a uint8 ``[H, W, 3]`` image of any size:

1. Colour per pixel: a pixel whose brightest channel is below ``min_brightness`` (of 255) is
   background; otherwise its RGB divided by its brightest channel (so dim and anti-aliased
   pixels keep their hue) is matched to the nearest palette colour (:data:`COLORS`, also
   normalised). A dark pixel of a saturated colour is thus still that colour.
2. Connected components per colour (8-connected, ``scipy.ndimage.label``), holes filled;
   components smaller than ``min_area_fraction`` of the image are dropped (edge fringes, noise).
3. Shape from geometry: the component's soft mask (brightness relative to its core, including
   the dim anti-aliased fringe) is compared with an ideal circle, square and upright triangle of
   the same area and centroid, drawn anti-aliased on the same pixels; the smallest L1 difference
   wins (:func:`classify_shape`). This uses fill ratio and corners together (a square fills its
   box, a circle leaves four corners empty, a triangle two half-boxes, apex on top) and stays
   right for 7-px objects at 32×32, where bounding-box fill ratios of binary masks do not.

Rules (:func:`judge`) follow GenEval's ``evaluate_images.py``: each ``include`` entry needs at
least ``count`` detected objects of its class (and colour, if given); each ``exclude`` entry
fails when ``count`` or more of its class are present (that makes counting exact); for
``position`` the first ``count`` objects of the entry (largest first, GenEval takes the most
confident) must all stand in the relation to those of the target entry, with GenEval's box
rule and margin (:func:`tokenloom.data.shapes.relative_position`). One difference: GenEval
classifies the colour of the top-``count`` detections of a class; here colour is detected
exactly, so an entry with a colour simply counts objects of that class *and* colour.
A sample scores 1 or 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tokenloom.data.shapes import COLOR_NAMES, COLORS, SHAPES, relative_position, shape_coverage

MIN_BRIGHTNESS = 100
MIN_AREA_FRACTION = 0.01  # 10 px at 32×32; the smallest data-set object has ≈ 24 px

_PALETTE = np.asarray([COLORS[c] for c in COLOR_NAMES], dtype=np.float32) / 255.0  # [7, 3], max 1 each


@dataclass(frozen=True)
class Detection:
    """One detected object. ``box``: ``(x0, y0, x1, y1)`` in fractions of width/height (y down)."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    area: int  # pixels
    score: float  # fit of the winning shape (1 = perfect), see classify_shape


def classify_shape(coverage: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape for a soft mask ``coverage`` (float ``[h, w]`` in [0, 1]) and its fit score.

    For each shape, the ideal shape with the mask's area (sum of coverage) and centroid is drawn
    (anti-aliased) on the same window; the score is ``1 - sum|coverage - ideal| / area``.
    """
    h, w = coverage.shape
    area = float(coverage.sum())
    if area <= 0:
        return SHAPES[0], 0.0
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = float((coverage * xs).sum() / area), float((coverage * ys).sum() / area)
    supersample = 4 if max(h, w) <= 24 else 2 if max(h, w) <= 64 else 1  # sub-pixel detail matters when small
    best, best_score = SHAPES[0], -np.inf
    for shape in SHAPES:
        if shape == "circle":
            size, centre_y = 2 * np.sqrt(area / np.pi), cy
        elif shape == "square":
            size, centre_y = np.sqrt(area), cy
        else:  # triangle: area size²/2, centroid 2/3 of the way down from the apex
            size = np.sqrt(2 * area)
            centre_y = cy - size / 6
        ideal = shape_coverage(shape, cx, centre_y, size, 0, 0, w, h, supersample=supersample)
        score = 1.0 - float(np.abs(coverage - ideal).sum()) / area
        if score > best_score:
            best, best_score = shape, score
    return best, best_score


def color_map(image: np.ndarray, min_brightness: int = MIN_BRIGHTNESS) -> np.ndarray:
    """Per-pixel palette index (into :data:`COLOR_NAMES`) or -1 for background: int ``[H, W]``."""
    rgb = image.astype(np.float32) / 255.0
    peak = rgb.max(axis=2)  # [H, W]
    hue = rgb / np.maximum(peak, 1e-6)[..., None]  # [H, W, 3]
    dist = ((hue[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)  # [H, W, 7]
    labels = dist.argmin(axis=2)
    labels[peak * 255.0 < min_brightness] = -1
    return labels


def _soft_mask(peak: np.ndarray, colors: np.ndarray, comps: np.ndarray, k: int, sl) -> np.ndarray:
    """Coverage of component ``k`` on its box grown by 2 px: float ``[h, w]`` in [0, 1].

    Pixels of the (hole-filled) component, plus the dim background fringe touching it, weighted
    by brightness relative to the component's bright core (95th percentile).
    """
    H, W = peak.shape
    ys = slice(max(sl[0].start - 2, 0), min(sl[0].stop + 2, H))
    xs = slice(max(sl[1].start - 2, 0), min(sl[1].stop + 2, W))
    mask = ndimage.binary_fill_holes(comps[ys, xs] == k)
    fringe = ndimage.binary_dilation(mask, iterations=2) & (colors[ys, xs] < 0)
    ref = max(float(np.percentile(peak[ys, xs][mask], 95)), 1.0)
    return np.clip(peak[ys, xs] / ref, 0.0, 1.0) * (mask | fringe)


def detect_objects(
    image: np.ndarray, min_area_fraction: float = MIN_AREA_FRACTION, min_brightness: int = MIN_BRIGHTNESS
) -> list[Detection]:
    """Coloured shapes in a uint8 ``[H, W, 3]`` image, largest first."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got dtype={image.dtype} shape={image.shape}")
    h, w = image.shape[:2]
    min_area = max(min_area_fraction * h * w, 1.0)
    colors = color_map(image, min_brightness)
    peak = image.max(axis=2).astype(np.float32)  # [H, W]
    found: list[Detection] = []
    for ci in np.unique(colors):
        if ci < 0:
            continue
        comps, _ = ndimage.label(colors == ci, structure=np.ones((3, 3), dtype=bool))
        for k, sl in enumerate(ndimage.find_objects(comps), start=1):
            mask = ndimage.binary_fill_holes(comps[sl] == k)
            area = int(mask.sum())
            if area < min_area:
                continue
            shape, score = classify_shape(_soft_mask(peak, colors, comps, k, sl))
            box = (sl[1].start / w, sl[0].start / h, sl[1].stop / w, sl[0].stop / h)
            found.append(Detection(shape, COLOR_NAMES[ci], box, area, score))
    return sorted(found, key=lambda d: -d.area)


def judge(image: np.ndarray, metadata: dict) -> tuple[bool, str]:
    """Whether ``image`` satisfies a GenEval requirement (``include``/``exclude``), and why not.

    ``metadata``: GenEval's fields, e.g. ``{"tag": "position", "include": [{"class": "square",
    "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}``.
    """
    return judge_detections(detect_objects(image), metadata)


def judge_detections(detections: list[Detection], metadata: dict) -> tuple[bool, str]:
    """:func:`judge` on already detected objects (largest first)."""
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        cands = [d for d in detections if d.shape == cls and ("color" not in req or d.color == req["color"])]
        found, matched = cands[:count], True
        what = f"{req['color']} {cls}" if "color" in req else cls
        if len(found) < count:
            matched = False
            reasons.append(f"expected {what}>={count}, found {len(cands)}")
        elif "position" in req:
            relation, target = req["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {what} to be {relation}")
            else:
                for obj in found:
                    for tgt in groups[target]:
                        actual = relative_position(obj.box, tgt.box)
                        if relation not in actual:
                            matched = False
                            reasons.append(f"expected {what} {relation} target, found {sorted(actual) or 'none'}")
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n = sum(d.shape == req["class"] for d in detections)
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, "; ".join(reasons)
