"""GenEval's folder layout, the shapes prompt list, and scoring a folder with the shapes judge.

Layout (the same one GenEval's own ``evaluate_images.py`` reads, so one generation script serves
both)::

    <outdir>/<index:05d>/metadata.jsonl        one JSON line: {"tag", "include", ["exclude"], "prompt"}
    <outdir>/<index:05d>/samples/<k:04d>.png   the images generated for that prompt

Metadata mirrors GenEval's ``evaluation_metadata.jsonl``: ``tag`` is the category,
``include`` is a list of ``{"class", "count"[, "color"][, "position": [relation, target]]}``,
``exclude`` (counting only) ``[{"class", "count": n + 1}]``.

The prompt list is a JSONL file of such metadata lines, drawn from the shapes data set's held-out
``"test"`` split, ``num_per_category`` per category (100 by default), grouped by category.
Scores are accuracy per category and overall = mean of the per-category accuracies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from tokenloom.data.shapes import CATEGORIES, ShapesDataset
from tokenloom.evaluation.shapes_judge import judge

GENEVAL_KEYS = ("tag", "include", "exclude", "prompt")


def geneval_metadata(scene: dict) -> dict:
    """GenEval metadata for a shapes scene (``ShapesDataset.metadata(i)`` or ``sample_scene(...)``)."""
    meta = {"tag": scene["category"], "include": scene["include"]}
    if scene.get("exclude"):
        meta["exclude"] = scene["exclude"]
    meta["prompt"] = scene["caption"]
    return meta


def held_out_scenes(
    num_per_category: int = 100, seed: int = 0, categories: Sequence[str] = CATEGORIES
) -> list[dict]:
    """``num_per_category`` scenes of each category from the held-out split, grouped by category."""
    if not isinstance(num_per_category, int) or num_per_category < 1:
        raise ValueError(f"num_per_category={num_per_category!r} must be a positive int")
    scenes = []
    for category in categories:
        ds = ShapesDataset("test", num_samples=num_per_category, seed=seed, categories=[category])
        scenes.extend(ds.scene(i) for i in range(num_per_category))
    return scenes


def make_prompts(
    num_per_category: int = 100, seed: int = 0, categories: Sequence[str] = CATEGORIES
) -> list[dict]:
    """The prompt list: GenEval metadata of :func:`held_out_scenes`."""
    return [geneval_metadata(s) for s in held_out_scenes(num_per_category, seed, categories)]


def _check_metadata(metadata, where: str = "metadata") -> None:
    if not isinstance(metadata, dict) or not {"tag", "include", "prompt"} <= set(metadata):
        raise ValueError(f"{where} must be a dict with keys 'tag', 'include', 'prompt'; got {metadata!r}")


def write_prompts(path: str | Path, prompts: Sequence[dict]) -> Path:
    """Write a prompt list (GenEval metadata dicts) as JSONL, one line each."""
    for i, meta in enumerate(prompts):
        _check_metadata(meta, f"prompts[{i}]")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(m) + "\n" for m in prompts))
    return path


def read_prompts(path: str | Path) -> list[dict]:
    """Read a JSONL prompt list (GenEval's ``evaluation_metadata.jsonl`` format)."""
    prompts = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for i, meta in enumerate(prompts):
        _check_metadata(meta, f"{path} line {i + 1}")
    return prompts


def _as_uint8_images(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if isinstance(images, (Image.Image, np.ndarray)) or not isinstance(images, Sequence) or not images:
        raise TypeError(f"images must be a non-empty list of PIL images or uint8 [H, W, 3] arrays, got {type(images)}")
    out = []
    for k, img in enumerate(images):
        arr = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"images[{k}] must be uint8 [H, W, 3], got dtype={arr.dtype} shape={arr.shape}")
        out.append(arr)
    return out


def write_geneval_sample(outdir: str | Path, index: int, metadata: dict, images) -> Path:
    """Write one prompt's folder: ``<outdir>/<index:05d>/metadata.jsonl`` and ``samples/<k:04d>.png``.

    ``images``: a list of PIL images or uint8 ``[H, W, 3]`` arrays, or one uint8 ``[N, H, W, 3]``
    array. Returns the prompt's folder.
    """
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index={index!r} must be a non-negative int")
    _check_metadata(metadata)
    arrays = _as_uint8_images(images)
    folder = Path(outdir) / f"{int(index):05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    for k, arr in enumerate(arrays):
        Image.fromarray(arr).save(folder / "samples" / f"{k:04d}.png")
    return folder


def iter_geneval_folder(outdir: str | Path) -> Iterator[tuple[int, dict, list[Path]]]:
    """``(index, metadata, sample paths)`` for every ``<index:05d>`` folder in ``outdir``, in order."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        raise ValueError(f"outdir={str(outdir)!r} is not a directory")
    for folder in sorted(p for p in outdir.iterdir() if p.is_dir() and p.name.isdigit()):
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        metadata = json.loads(lines[0])
        _check_metadata(metadata, str(folder / "metadata.jsonl"))
        yield int(folder.name), metadata, sorted((folder / "samples").glob("*.png"))


def load_image(path: str | Path) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB image from a file."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def score_folder(
    outdir: str | Path,
    judge_fn: Callable[[np.ndarray, dict], tuple[bool, str]] = judge,
    progress: bool = True,
) -> dict:
    """Judge every sample in a GenEval-layout folder.

    Returns ``{"overall", "per_category": {tag: accuracy}, "num_samples": {tag: n},
    "num_prompts", "results": [{"index", "sample", "tag", "prompt", "correct", "reason"}]}``;
    ``overall`` is the mean of the per-category accuracies (GenEval's), over categories present.
    """
    entries = list(iter_geneval_folder(outdir))
    if not entries:
        raise ValueError(f"outdir={str(outdir)!r} holds no <index:05d>/metadata.jsonl folders")
    results = []
    total = sum(len(paths) for _, _, paths in entries)
    with tqdm(total=total, desc="shapes-GenEval", disable=not progress) as bar:
        for index, meta, paths in entries:
            for path in paths:
                correct, reason = judge_fn(load_image(path), meta)
                results.append({"index": index, "sample": path.name, "tag": meta["tag"],
                                "prompt": meta["prompt"], "correct": bool(correct), "reason": reason})
                bar.update()
    return summarize(results, num_prompts=len(entries))


def summarize(results: Sequence[dict], num_prompts: int | None = None) -> dict:
    """Per-category and overall accuracy from per-sample results (``{"tag", "correct", ...}``)."""
    tags = [t for t in CATEGORIES if any(r["tag"] == t for r in results)]
    tags += sorted({r["tag"] for r in results} - set(tags))
    per_category = {t: float(np.mean([r["correct"] for r in results if r["tag"] == t])) for t in tags}
    return {
        "overall": float(np.mean(list(per_category.values()))) if per_category else float("nan"),
        "per_category": per_category,
        "num_samples": {t: sum(r["tag"] == t for r in results) for t in tags},
        "num_prompts": num_prompts,
        "results": list(results),
    }


def format_table(report: dict) -> str:
    """A readable table of a :func:`score_folder` report."""
    rows = [f"{'category':<14} {'accuracy':>8} {'samples':>8}", "-" * 32]
    for tag, acc in report["per_category"].items():
        rows.append(f"{tag:<14} {acc:>8.3f} {report['num_samples'][tag]:>8d}")
    rows += ["-" * 32, f"{'overall':<14} {report['overall']:>8.3f} {sum(report['num_samples'].values()):>8d}"]
    return "\n".join(rows)
