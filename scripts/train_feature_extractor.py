"""Train the built-in FID/IS feature extractor (a small CNN classifier) for shapes or digits.

    python scripts/train_feature_extractor.py --dataset shapes --out runs/fe-shapes
    python scripts/train_feature_extractor.py --dataset digits --out runs/fe-digits \
        --safetensors fe-digits.safetensors

Trains on the data set's training split (shapes: SingleShapeDataset, 21 shape×colour classes at
32 px; digits: DigitsDataset, 10 classes at 16 px), prints the held-out accuracy and the label FIDs
made with it will carry, and writes a ``save_pretrained`` folder (and optionally one safetensors
file). Seconds to a minute on a CPU; same seed → same weights.

``--export-images DIR`` also writes PNG folders to check an FID setup with
``scripts/evaluate_fid.py``: ``train`` and ``test`` (held-out) images of the data set (shapes:
the multi-object ShapesDataset scenes), and shifted copies of ``test``: for shapes,
``test_channels_permuted`` (R,G,B → G,B,R: maps the 7-colour palette onto itself, so *not* a
distribution shift for this data) and ``test_colours_mixed`` (each pixel averaged with its
channel-permuted self: off-palette colours, a real shift); for digits, ``test_mirrored``.
"""

import argparse
import json
from pathlib import Path

import torch

from tokenloom.evaluation.class_balanced import save_images
from tokenloom.evaluation.features import (
    BUILTIN_KINDS,
    builtin_dataset,
    classifier_accuracy,
    stack_dataset,
    train_feature_cnn,
)


def export_images(kind: str, folder: Path, n: int, seed: int) -> dict[str, str]:
    """Write train/test/shifted PNG folders under ``folder``; returns {name: path}."""
    if kind == "shapes":
        from tokenloom.data.shapes import ShapesDataset

        train, _ = stack_dataset(ShapesDataset("train", image_size=32, num_samples=n, seed=seed))
        test, _ = stack_dataset(ShapesDataset("test", image_size=32, num_samples=n, seed=seed))
        sets = {
            "train": train,
            "test": test,
            "test_channels_permuted": test[:, [1, 2, 0]],
            "test_colours_mixed": (test + test[:, [1, 2, 0]]) / 2,
        }
    else:
        train, _ = stack_dataset(builtin_dataset(kind, "train"), limit=n)
        test, _ = stack_dataset(builtin_dataset(kind, "test"), limit=n)
        sets = {"train": train, "test": test, "test_mirrored": test.flip(-1)}
    paths = {}
    for name, images in sets.items():
        save_images(images, folder / name, [f"{i:06d}.png" for i in range(len(images))])
        paths[name] = str(folder / name)
    return paths


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", required=True, choices=BUILTIN_KINDS)
    parser.add_argument("--out", required=True, help="save_pretrained folder to write")
    parser.add_argument(
        "--safetensors", default=None, help="also write one .safetensors file (config in metadata)"
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--num-samples", type=int, default=3000, help="training images (shapes; digits uses all)"
    )
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--export-images", default=None, metavar="DIR", help="write train/test/shifted PNG folders"
    )
    parser.add_argument("--num-export", type=int, default=1000, help="images per exported folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    model = train_feature_cnn(
        args.dataset,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        num_samples=args.num_samples,
        feature_dim=args.feature_dim,
        channels=tuple(args.channels),
        seed=args.seed,
        progress=not args.no_progress,
    )
    test_images, test_labels = stack_dataset(
        builtin_dataset(args.dataset, "test", num_samples=1000, seed=args.seed)
    )
    with torch.no_grad():
        accuracy = classifier_accuracy(model, test_images, test_labels)
    model.save_pretrained(args.out)
    if args.safetensors:
        model.save_safetensors(args.safetensors)
    summary = {
        "dataset": args.dataset,
        "label": model.label,
        "test_accuracy": accuracy,
        "out": args.out,
        "safetensors": args.safetensors,
        "feature_dim": args.feature_dim,
    }
    if args.export_images:
        summary["exported"] = export_images(
            args.dataset, Path(args.export_images), args.num_export, args.seed
        )
    print(f"{model.label}: held-out accuracy {accuracy:.4f}; saved to {args.out}")
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
