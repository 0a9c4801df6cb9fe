"""Train a caption scorer (the reranker of text-to-image candidates) from a YAML recipe.

    python scripts/train_scorer.py --config configs/scoring/shapes_captioner.yaml --output-dir runs/scorer \
        [train.max_steps=200 ...]

Prints the held-out caption NLL per token (``eval_data``) and writes a ``save_pretrained`` folder that a
text-to-image pipeline takes as its ``scorer`` (see ``docs/default_model.md``).
"""

from __future__ import annotations

import json

from tokenloom.training.entry import parse_single_run_args
from tokenloom.training.scorer_trainer import train_scorer_from_config


def main(argv=None) -> dict:
    cfg, output_dir, progress = parse_single_run_args(argv, __doc__, "scoring", "scorer folder")
    out = train_scorer_from_config(cfg, output_dir, progress=progress)
    print(json.dumps({"train": out["train"], "eval": out["eval"]}, indent=1))
    return out


if __name__ == "__main__":
    main()
