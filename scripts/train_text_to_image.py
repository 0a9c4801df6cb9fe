"""Train a text-to-image pipeline (tokenizer, text conditioner, generator) from a YAML recipe.

    python scripts/train_text_to_image.py configs/pipeline/shapes_text_to_image.yaml --output-dir runs/t2i \
        [--set train.max_minutes=3 ...]
"""

from __future__ import annotations

import argparse

import yaml

from tokenloom.training.recipes import apply_override
from tokenloom.training.text_to_image import train_text_to_image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML recipe (configs/pipeline/*.yaml)")
    parser.add_argument("--output-dir", required=True, help="pipeline folder to write")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe entry")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    for assignment in args.set:
        apply_override(cfg, assignment)
    train_text_to_image(cfg, args.output_dir, progress=not args.no_progress)
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
