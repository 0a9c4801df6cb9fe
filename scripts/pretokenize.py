"""Encode a data set once with a saved tokenizer into token shards, for generator training (as LlamaGen does):

    python scripts/pretokenize.py --tokenizer runs/vq/tokenizer --output tokens/shapes \
        data.name=single_shapes data.split=train data.num_samples=20000 [--condition class] [--shard-size 10000]

The data set is given as dot-list ``data.*`` entries (any name of ``tokenloom.training.data_sources.DATASETS``,
its constructor arguments checked); ``--condition text`` also needs ``--conditioner DIR`` (a saved text
conditioner whose features are stored). A generator recipe then reads the shards with
``data: {name: token_shards, root: tokens/shapes}``. Single process.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from tokenloom.training.config_schema import apply_override, check_named_section
from tokenloom.training.data_sources import build_dataset, dataset_class
from tokenloom.training.generator_trainer import load_tokenizer
from tokenloom.training.pretokenize import CONDITIONS, write_token_shards


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer folder")
    parser.add_argument("--output", required=True, help="folder for the shards and index.json")
    parser.add_argument("overrides", nargs="+", metavar="data.KEY=VALUE", help="the data set, e.g. data.name=digits")
    parser.add_argument("--condition", default="class", choices=CONDITIONS)
    parser.add_argument("--conditioner", default=None, help="saved text conditioner (for --condition text)")
    parser.add_argument("--shard-size", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError("scripts/pretokenize.py runs as one process; launch it with python, not with several "
                           "accelerate processes")
    cfg: dict = {}
    for item in args.overrides:
        if not item.startswith("data."):
            parser.error(f"overrides name the data set as data.KEY=VALUE, got {item!r}")
        apply_override(cfg, item)
    check_named_section(cfg["data"], "data", dataset_class)
    data_cfg = dict(cfg["data"])
    dataset = build_dataset(data_cfg.pop("name"), **data_cfg)
    tokenizer = load_tokenizer(args.tokenizer)
    text_encoder = None
    if args.condition == "text":
        if args.conditioner is None:
            parser.error("--condition text needs --conditioner DIR")
        from tokenloom import conditioning

        conditioner = conditioning.CONDITIONERS.load(args.conditioner).eval()

        def text_encoder(captions):
            with torch.no_grad():
                cond = conditioner.encode(captions)
            return cond.features, cond.mask

    index = write_token_shards(tokenizer, dataset, args.output, condition=args.condition, shard_size=args.shard_size,
                               batch_size=args.batch_size, text_encoder=text_encoder, progress=not args.no_progress,
                               source={"data": cfg["data"], "tokenizer": os.path.abspath(args.tokenizer)})
    summary = {"output": args.output, "num_items": index["num_items"], "shards": len(index["shards"]),
               "spec": index["spec"], "condition": index["condition"]}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
