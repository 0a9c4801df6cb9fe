"""``make demo``: text-to-image from the default model; writes PNGs and prints their paths.

The default model is the packaged one when it ships (``tokenloom/assets/default/text-to-image``).
Until then the first run trains a small model on the built-in shapes set (recipe:
``tokenloom.training.recipes.train_shapes_text_to_image``) and caches it under ``.cache/demo-model``;
later runs reuse the cache.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PROMPTS = [
    "a red circle",
    "a green triangle",
    "two blue squares",
    "a yellow square and a magenta circle",
    "a white circle above a cyan triangle",
    "three triangles",
]


def resolve_model(cache_dir: Path, minutes: float) -> Path:
    from tokenloom.pipelines.registry import default_model

    try:
        return default_model("text-to-image")
    except ValueError:
        pass
    if (cache_dir / "model_index.json").exists():
        print(f"using the cached demo model in {cache_dir}")
        return cache_dir
    from tokenloom.training.recipes import train_shapes_text_to_image

    print(f"no trained default ships yet: training a small text-to-image model on shapes (≤ {minutes:g} min) "
          f"into {cache_dir}")
    train_shapes_text_to_image(cache_dir, minutes=minutes)
    return cache_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="folder for the PNGs")
    parser.add_argument("--cache", default=".cache/demo-model", help="where the trained demo model is cached")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget when no model exists")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from torchvision.utils import make_grid, save_image

    import tokenloom

    start = time.time()
    model = resolve_model(Path(args.cache), args.minutes)
    pipe = tokenloom.pipeline("text-to-image", model=str(model))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = pipe(PROMPTS, num_images_per_prompt=4, generator=torch.Generator().manual_seed(args.seed),
                  output_type="pt").images
    paths = []
    for i, prompt in enumerate(PROMPTS):
        path = out_dir / f"{i:02d}_{prompt.replace(' ', '_')}.png"
        save_image(make_grid(images[4 * i:4 * i + 4], nrow=4, padding=1), path)
        paths.append(path)
    grid = out_dir / "grid.png"
    save_image(make_grid(images, nrow=8, padding=1), grid)
    for prompt, path in zip(PROMPTS, paths):
        print(f"{path}  <- {prompt!r}")
    print(f"{grid}  <- all prompts, 4 samples each")
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
