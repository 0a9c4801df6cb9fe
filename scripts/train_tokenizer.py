"""Train a tokenizer from a YAML recipe, on one process or many:

    accelerate launch scripts/train_tokenizer.py --config configs/tokenizer/vq_shapes.yaml train.max_steps=200
    python scripts/train_tokenizer.py --config configs/tokenizer/vq_shapes.yaml --output-dir runs/vq --resume latest

Overrides are dot-lists (``section.key=value``); ``--output-dir DIR`` (default: the recipe's ``train.output_dir``
or ``runs/<recipe name>``), ``--resume latest|CHECKPOINT``. Prints the evaluation metrics as JSON at the end (also
written to ``<output-dir>/eval.json``). Two CPU ranks: ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu
--num_processes 2 ...`` or ``--config_file configs/accelerate/cpu_2proc.yaml``.
"""

from __future__ import annotations

import json

from accelerate import PartialState

from tokenloom.training.entry import parse_recipe_args
from tokenloom.training.tokenizer_trainer import train_from_config


def main(argv: list[str] | None = None) -> dict:
    cfg, output_dir, progress = parse_recipe_args(argv, "tokenizer", __doc__.splitlines()[0])
    result = train_from_config(cfg, output_dir=output_dir, progress=progress)
    summary = {"output_dir": output_dir, "train_steps": result["train"]["steps"],
               "train_minutes": round(result["train"]["minutes"], 2),
               "train_cpu_minutes": round(result["train"]["cpu_minutes"], 2),
               "stopped_by": result["train"]["stopped_by"],
               "threads": result["train"]["threads"], "eval": result["eval"]}
    if PartialState().is_main_process:
        print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
