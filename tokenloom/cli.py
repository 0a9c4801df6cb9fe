"""The ``tokenloom`` command line: ``tokenloom generate "a red circle" -o out.png``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _save_images(images, out: Path, grid: bool) -> list[Path]:
    from torchvision.utils import make_grid, save_image

    out.parent.mkdir(parents=True, exist_ok=True)
    if grid or len(images) == 1:
        nrow = max(1, int(len(images) ** 0.5 + 0.999))
        save_image(make_grid(images, nrow=nrow, padding=2), out)
        return [out]
    paths = []
    for i, img in enumerate(images):
        p = out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
        save_image(img, p)
        paths.append(p)
    return paths


def cmd_generate(args) -> int:
    import torch

    import tokenloom

    task = "class-to-image" if args.class_label is not None else "text-to-image"
    pipe = tokenloom.pipeline(task, model=args.model)
    kwargs = dict(num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(args.seed),
                  output_type="pt", guidance_scale=args.guidance_scale, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p)
    if task == "text-to-image":
        if not args.prompt:
            raise SystemExit("tokenloom generate: give a prompt, or --class-label N for a class-conditional model")
        out = pipe(args.prompt, **kwargs)
    else:
        out = pipe(args.class_label, **kwargs)
    for p in _save_images(out.images, Path(args.output), args.grid):
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenloom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="prompt or class → PNG (or a grid)")
    gen.add_argument("prompt", nargs="*", help="one or more prompts (text-to-image)")
    gen.add_argument("--class-label", type=int, nargs="+", default=None, help="class indices (class-to-image)")
    gen.add_argument("-m", "--model", default=None, help="pipeline folder (default: the packaged model)")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG path")
    gen.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt or class")
    gen.add_argument("--grid", action="store_true", help="write one grid PNG instead of one file per image")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"tokenloom {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
