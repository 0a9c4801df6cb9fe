"""Train a text-to-image pipeline (tokenizer, text conditioner, generator) from a YAML recipe.

    python scripts/train_text_to_image.py --config configs/pipeline/shapes_text_to_image.yaml --output-dir runs/t2i \
        [train.max_minutes=3 tokenizer.path=runs/zoo/vq ...]

The same command line as ``scripts/train_tokenizer.py`` and ``scripts/train_generator.py``: ``--config`` and
dot-list overrides (``section.key=value``, the value parsed as YAML). Single process (the recipe trains the
tokenizer, then the conditioner and generator jointly, in time-budgeted rounds).
"""

from __future__ import annotations

import argparse

from tokenloom.training.config_schema import load_recipe_file
from tokenloom.training.text_to_image import train_text_to_image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (configs/pipeline/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-list overrides of recipe entries")
    parser.add_argument("--output-dir", required=True, help="pipeline folder to write")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"override {item!r} must look like section.key=value")
    cfg = load_recipe_file(args.config, args.overrides)
    train_text_to_image(cfg, args.output_dir, progress=not args.no_progress)
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
