"""Train a caption scorer (the reranker of text-to-image candidates) from a YAML recipe.

    python scripts/train_scorer.py --config configs/scoring/shapes_captioner.yaml --output-dir runs/scorer \
        [train.max_steps=200 ...]

Prints the held-out caption NLL per token (``eval_data``) and writes a ``save_pretrained`` folder that a
text-to-image pipeline takes as its ``scorer`` (see ``docs/default_model.md``).
"""

from __future__ import annotations

import argparse
import json

from tokenloom.training.config_schema import load_recipe_file
from tokenloom.training.scorer_trainer import train_scorer_from_config


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (configs/scoring/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-list overrides of recipe entries")
    parser.add_argument("--output-dir", required=True, help="scorer folder to write")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"override {item!r} must look like section.key=value")
    out = train_scorer_from_config(load_recipe_file(args.config, args.overrides), args.output_dir,
                                   progress=not args.no_progress)
    print(json.dumps({"train": out["train"], "eval": out["eval"]}, indent=1))
    return out


if __name__ == "__main__":
    main()
