"""Train a tokenizer from a YAML recipe: ``python scripts/train_tokenizer.py configs/tokenizer/vq_shapes.yaml``.

Options: ``--output-dir DIR`` (default: the recipe's ``train.output_dir`` or ``runs/<recipe name>``),
``--set key.sub=value`` to override recipe entries (YAML values, e.g. ``--set train.max_steps=200``).
Prints the evaluation metrics as JSON at the end (also written to ``<output-dir>/eval.json``).
"""

from __future__ import annotations

import argparse
import json
import os

import yaml

from tokenloom.training.tokenizer_trainer import train_from_config


def apply_override(cfg: dict, assignment: str) -> None:
    """``"train.max_steps=200"`` → ``cfg["train"]["max_steps"] = 200`` (value parsed as YAML)."""
    if "=" not in assignment:
        raise ValueError(f"--set expects key.sub=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML recipe (configs/tokenizer/*.yaml)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        cfg = yaml.safe_load(f)
    for assignment in args.set:
        apply_override(cfg, assignment)
    name = os.path.splitext(os.path.basename(args.config))[0]
    output_dir = args.output_dir or cfg.get("train", {}).get("output_dir") or os.path.join("runs", name)
    result = train_from_config(cfg, output_dir=output_dir, progress=not args.no_progress)
    summary = {"output_dir": output_dir, "train_steps": result["train"]["steps"],
               "train_minutes": round(result["train"]["minutes"], 2),
               "train_cpu_minutes": round(result["train"]["cpu_minutes"], 2),
               "stopped_by": result["train"]["stopped_by"],
               "threads": result["train"]["threads"], "eval": result["eval"]}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
