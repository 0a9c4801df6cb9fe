"""Evaluate trained tokenizer folders on held-out images and print one markdown table.

``python scripts/evaluate_tokenizer.py runs/zoo/* [--json OUT]``

Each argument is a folder written by ``scripts/train_tokenizer.py`` (``save_pretrained``: ``config.json`` naming
a registered tokenizer class, plus weights; optionally ``train_log.json``). Arguments that are not folders (e.g.
the ``*.log`` files next to them) and folders without ``config.json`` (a run still training) are skipped with a
note on stderr. Every tokenizer is evaluated on the same images, by default the recipes' ``eval_data``: the shapes
test split, 1000 images, seed 0, at the tokenizer's ``image_size``.

Table columns: tokenizer (folder name), class (registry name), the spec (kind, layout, vocab, depth, bits, dim,
tokens = positions ``L`` per image, bits/img = information per image: ``L·depth·log2(vocab)`` for index tokens,
``L·bits`` for bit tokens), PSNR (dB) and SSIM (means over images), codebook usage and perplexity (index tokens
only, ``-`` otherwise), and training CPU-minutes and steps of the training loop from ``train_log.json``
(``-`` when absent). Tokenizers with a ``Sequence`` layout (FlexTok-style) get a second table: PSNR when only the
first ``k`` tokens are decoded, ``k = 1, 2, 4, ..., N``.

Metrics come from :mod:`tokenloom.evaluation.reconstruction` (``evaluate_reconstruction``,
``evaluate_prefixes``); images from ``data_sources.build_dataset`` (as the trainer); folders load through the
tokenizer registry (``generator_trainer.load_tokenizer``). ``torch`` is seeded with ``--seed`` before each
tokenizer, so a sampling decoder (FlexTok's flow decoder) gives the same numbers on every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from tokenloom.evaluation.reconstruction import evaluate_prefixes, evaluate_reconstruction
from tokenloom.tokens import Grid, Scales, Sequence, TokenSpec
from tokenloom.training.data_sources import build_dataset
from tokenloom.training.generator_trainer import load_tokenizer

COLUMNS = ("tokenizer", "class", "kind", "layout", "vocab", "depth", "bits", "dim", "tokens", "bits/img",
           "PSNR (dB)", "SSIM", "usage", "perplexity", "train CPU-min", "train steps")


def layout_text(layout) -> str:
    """``Grid(8, 8)`` → ``grid 8x8``; ``Scales`` → ``scales 1,2,4 (3)``; ``Sequence(64)`` → ``sequence 64``."""
    if isinstance(layout, Grid):
        return f"grid {layout.h}x{layout.w}"
    if isinstance(layout, Scales):
        sides = ",".join(str(h) if h == w else f"{h}x{w}" for h, w in layout.sizes)
        return f"scales {sides} ({layout.num_scales})"
    if isinstance(layout, Sequence):
        return f"sequence {layout.length}"
    raise TypeError(f"layout must be a Grid, Scales or Sequence, got {layout!r}")


def bits_per_image(spec: TokenSpec) -> float | None:
    """Information capacity of one image's tokens in bits; None for continuous tokens."""
    if spec.kind == "index":
        return spec.length * spec.depth * math.log2(spec.vocab_size)
    if spec.kind == "bits":
        return float(spec.length * spec.bits)
    return None


def training_record(folder: str) -> dict | None:
    """``<folder>/train_log.json`` (the trainer's ``TrainResult``) or None when absent."""
    path = os.path.join(folder, "train_log.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def evaluate_folder(folder: str, dataset_cfg: dict, batch_size: int = 64, seed: int = 0,
                    progress: bool = False) -> dict:
    """Load one tokenizer folder and evaluate it on ``build_dataset(**dataset_cfg)`` (``image_size`` defaults
    to the tokenizer's). Returns one row: spec fields, metrics, training record and, for ``Sequence`` layouts,
    ``"prefix": {k: {"psnr", "ssim", "num_images"}}``."""
    tokenizer = load_tokenizer(folder).eval()
    spec = tokenizer.spec
    cfg = dict(dataset_cfg)
    if cfg.get("image_size") is None:
        if tokenizer.image_size is None:
            raise ValueError(f"{folder}: the tokenizer has no image_size; pass --image-size")
        cfg["image_size"] = tokenizer.image_size
    dataset = build_dataset(cfg.pop("name"), **cfg)
    torch.manual_seed(seed)
    metrics = evaluate_reconstruction(tokenizer, dataset, batch_size=batch_size, progress=progress)
    row = {"folder": folder, "tokenizer": os.path.basename(os.path.normpath(folder)),
           "class": getattr(tokenizer, "registry_name", type(tokenizer).__name__), "spec": spec.to_dict(),
           **metrics}
    record = training_record(folder)
    row["train_cpu_minutes"] = None if record is None else record.get("cpu_minutes")
    row["train_steps"] = None if record is None else record.get("steps")
    row["stopped_by"] = None if record is None else record.get("stopped_by")
    if isinstance(spec.layout, Sequence):
        torch.manual_seed(seed)
        row["prefix"] = evaluate_prefixes(tokenizer, dataset, batch_size=batch_size, progress=progress)
    return row


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_cells(row: dict) -> list[str]:
    """One row of the main table, in :data:`COLUMNS` order."""
    spec = TokenSpec.from_dict(row["spec"])
    bits = bits_per_image(spec)
    return [row["tokenizer"], row["class"], spec.kind, layout_text(spec.layout),
            "-" if spec.vocab_size is None else str(spec.vocab_size),
            str(spec.depth) if spec.kind == "index" else "-",
            "-" if spec.bits is None else str(spec.bits), "-" if spec.dim is None else str(spec.dim),
            str(spec.length), "-" if bits is None else f"{bits:.0f}",
            _fmt(row["psnr"], 2), _fmt(row["ssim"], 4),
            "-" if row.get("codebook_usage") is None else f"{100 * row['codebook_usage']:.1f} %",
            _fmt(row.get("perplexity"), 1), _fmt(row.get("train_cpu_minutes"), 2),
            "-" if row.get("train_steps") is None else str(row["train_steps"])]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render(rows: list[dict]) -> str:
    """The markdown output: the main table and, if any tokenizer has a Sequence layout, the prefix table."""
    text = markdown_table(list(COLUMNS), [table_cells(r) for r in rows])
    prefixed = [r for r in rows if r.get("prefix")]
    if prefixed:
        lengths = sorted({int(k) for r in prefixed for k in r["prefix"]})
        header = ["tokenizer"] + [f"k={k}" for k in lengths]
        body = [[r["tokenizer"]] + [_fmt(r["prefix"][k]["psnr"], 2) if k in r["prefix"] else "-" for k in lengths]
                for r in prefixed]
        text += "\n\nPSNR (dB) decoding only the first k tokens:\n\n" + markdown_table(header, body)
    return text


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", help="tokenizer folders (save_pretrained output), e.g. runs/zoo/*")
    parser.add_argument("--dataset", default="shapes", help="data set name (tokenizer_trainer.DATASETS)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--data-seed", type=int, default=0, help="the data set's seed")
    parser.add_argument("--image-size", type=int, default=None, help="default: each tokenizer's image_size")
    parser.add_argument("--seed", type=int, default=0, help="torch seed before each tokenizer (sampling decoders)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the rows as JSON to OUT")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dataset_cfg = {"name": args.dataset, "split": args.split, "num_samples": args.num_samples,
                   "seed": args.data_seed, "image_size": args.image_size}
    rows = []
    for folder in args.folders:
        if not os.path.isdir(folder):
            print(f"skipping {folder}: not a folder", file=sys.stderr)
            continue
        if not os.path.isfile(os.path.join(folder, "config.json")):
            print(f"skipping {folder}: no config.json (not a saved tokenizer, or still training)", file=sys.stderr)
            continue
        rows.append(evaluate_folder(folder, dataset_cfg, batch_size=args.batch_size, seed=args.seed,
                                    progress=not args.no_progress))
    if not rows:
        raise SystemExit(f"no tokenizer folders among {args.folders}")
    print(render(rows))
    result = {"data": {k: v for k, v in dataset_cfg.items()}, "tokenizers": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
