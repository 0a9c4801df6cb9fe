"""``make demo``: prompts in, images out, from the model that ships inside the package. No training, no download.

    python -m tokenloom.demo [--out outputs/demo] [--seed 0] [--model DIR]

Writes one PNG per prompt (4 samples, upscaled so 32x32 shapes are visible) and a labelled grid of all prompts,
then prints the paths. The model is the packaged default (``tokenloom/assets/default/text-to-image``, or
``$TOKENLOOM_DEFAULT_MODEL``); ``--model`` takes any text-to-image pipeline folder instead.
"""

from __future__ import annotations

import argparse
import time

START = time.time()

PROMPTS = [
    "a red circle",
    "a green triangle",
    "two blue squares",
    "a yellow square and a magenta circle",
    "a white circle above a cyan triangle",
    "three triangles",
]


def labelled_grid(images, prompts: list[str], per_prompt: int, scale: int = 4, label_width: int = 250):
    """One row per prompt: its label, then its ``per_prompt`` images upscaled ``scale`` times (PIL image)."""
    from PIL import Image, ImageDraw

    side = images[0].size[0] * scale
    pad = 4
    grid = Image.new("RGB", (label_width + per_prompt * (side + pad), len(prompts) * (side + pad)), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for row, prompt in enumerate(prompts):
        y = row * (side + pad)
        draw.text((6, y + side // 2 - 6), prompt, fill=(230, 230, 230))
        for k in range(per_prompt):
            img = images[row * per_prompt + k].resize((side, side), Image.NEAREST)
            grid.paste(img, (label_width + k * (side + pad), y))
    return grid


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="folder for the PNGs")
    parser.add_argument("--model", default=None, help="text-to-image pipeline folder (default: the packaged model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    parser.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the saved PNGs")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the model is tiny; more threads only wait on each other)")
    args = parser.parse_args(argv)

    from pathlib import Path

    import torch

    import tokenloom

    torch.set_num_threads(args.threads)
    pipe = tokenloom.pipeline("text-to-image", model=args.model)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPTS, num_images_per_prompt=args.per_prompt,
                  generator=torch.Generator().manual_seed(args.seed)).images
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    n = args.per_prompt
    for i, prompt in enumerate(PROMPTS):
        row = labelled_grid(images[i * n:(i + 1) * n], [prompt], n, args.scale, label_width=0)
        path = out_dir / f"{i:02d}_{prompt.replace(' ', '_')}.png"
        row.save(path)
        paths.append(str(path))
        print(f"{path}  <- {prompt!r}")
    grid = out_dir / "grid.png"
    labelled_grid(images, PROMPTS, n, args.scale).save(grid)
    paths.append(str(grid))
    print(f"{grid}  <- all prompts, {n} samples each")
    print(f"done in {time.time() - START:.1f} s (from the demo module's import: tokenloom, torch, model, images)")
    return paths


if __name__ == "__main__":
    main()
