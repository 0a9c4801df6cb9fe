"""Train a generator from a YAML recipe, on one process or many:

    accelerate launch scripts/train_generator.py --config configs/generator/digits_raster.yaml train.max_steps=500
    python scripts/train_generator.py --config configs/generator/digits_raster.yaml --output-dir runs/d --resume latest

Overrides are dot-lists (``section.key=value``); ``--output-dir DIR`` (default: the recipe's ``train.output_dir``
or ``runs/<recipe name>``; the generator goes to ``DIR/generator``, a tokenizer trained by the recipe to
``DIR/tokenizer``), ``--resume latest|CHECKPOINT``. Prints a JSON summary at the end. Two CPU ranks:
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...`` or
``--config_file configs/accelerate/cpu_2proc.yaml`` (set ``train.max_minutes=null``: a time budget is
single-process only). FSDP: ``--config_file configs/accelerate/fsdp.yaml`` (GPUs) or ``fsdp_cpu.yaml`` (two CPU
ranks over gloo).
"""

from __future__ import annotations

import json

from accelerate import PartialState

from tokenloom.training.entry import parse_recipe_args
from tokenloom.training.generator_trainer import train_from_config


def main(argv: list[str] | None = None) -> dict:
    cfg, output_dir, progress = parse_recipe_args(argv, "generator", __doc__.splitlines()[0])
    result = train_from_config(cfg, output_dir=output_dir, progress=progress)
    train = result["train"]
    summary = {"output_dir": output_dir, "generator_steps": train["steps"],
               "generator_minutes": round(train["minutes"], 2), "stopped_by": train["stopped_by"],
               "threads": train["threads"],
               "final_loss": train["history"][-1]["loss"] if train["history"] else None,
               "tokenizer_trained": result["tokenizer_train"] is not None}
    if PartialState().is_main_process:
        print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
