"""The command line shared by ``scripts/train_tokenizer.py`` and ``scripts/train_generator.py``.

    accelerate launch scripts/train_generator.py --config configs/generator/x.yaml train.lr=1e-4 \\
        [--output-dir DIR] [--resume latest|CHECKPOINT] [--no-progress]

Overrides are dot-lists (``section.key=value``, the value parsed as YAML) applied after the file is read; every
key is checked against the recipe schema (:mod:`.config_schema`) before anything runs.
"""

from __future__ import annotations

import argparse
import os

import torch
from accelerate import PartialState

from tokenloom.training.config_schema import check_recipe, load_recipe_file
from tokenloom.training.launch import check_process_count


def _check_overrides(parser: argparse.ArgumentParser, overrides: list[str]) -> None:
    for item in overrides:
        if "=" not in item:
            parser.error(f"override {item!r} must look like section.key=value")


def parse_recipe_args(argv: list[str] | None, kind: str, description: str) -> tuple[dict, str, bool]:
    """``argv`` → ``(recipe, output_dir, progress)``; ``kind`` is ``"tokenizer"`` or ``"generator"``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help=f"YAML recipe (configs/{kind}/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dot-list overrides of recipe entries, e.g. train.max_steps=200 generator.depth=2")
    parser.add_argument("--output-dir", default=None,
                        help="default: the recipe's train.output_dir, else runs/<recipe name>")
    parser.add_argument("--resume", default=None, metavar="latest|PATH",
                        help="resume from the newest checkpoint of the output folder (a fresh start when there is "
                             "none) or from a checkpoint folder")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    # before any work: a launch for N processes that runs as one must not start training
    check_process_count(PartialState(cpu=not torch.cuda.is_available()))
    _check_overrides(parser, args.overrides)
    cfg = load_recipe_file(args.config, args.overrides)
    if args.resume is not None:
        cfg.setdefault("train", {})["resume"] = args.resume
    check_recipe(cfg, kind)
    name = os.path.splitext(os.path.basename(args.config))[0]
    output_dir = args.output_dir or cfg.get("train", {}).get("output_dir") or os.path.join("runs", name)
    return cfg, output_dir, not args.no_progress


def parse_single_run_args(argv: list[str] | None, description: str, configs: str, output: str
                          ) -> tuple[dict, str, bool]:
    """The command line of the single-process recipe scripts (``train_text_to_image.py``, ``train_scorer.py``):
    ``--config`` (a YAML under ``configs/<configs>/``), dot-list overrides, a required ``--output-dir`` (what it
    writes: ``output``) and ``--no-progress`` → ``(recipe, output_dir, progress)``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"YAML recipe (configs/{configs}/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-list overrides of recipe entries")
    parser.add_argument("--output-dir", required=True, help=f"{output} to write")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    _check_overrides(parser, args.overrides)
    return load_recipe_file(args.config, args.overrides), args.output_dir, not args.no_progress


__all__ = ["parse_recipe_args", "parse_single_run_args"]
