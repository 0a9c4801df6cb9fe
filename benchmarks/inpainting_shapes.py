"""Zero-shot inpainting on shapes: does keeping half an image and its class beat completing it without the class?

Run: ``python -m benchmarks.inpainting_shapes --model runs/shapes_random_order --json out.json`` (a folder holding
``tokenizer/`` and ``generator/``, e.g. from ``scripts/train_generator.py --config
configs/generator/shapes_random_order.yaml``, or a pipeline folder with ``image_tokenizer/`` and ``token_generator/``).

Real single-shape test images (``SingleShapeDataset("test")``, 32x32) get their right half masked (a token is kept
when its whole patch lies in the left half). The shapes judge then checks the original caption's requirement (shape
and colour; and shape only) on:

* ``inpaint_class``: ``InpaintingPipeline`` with the image's class label (guidance ``--guidance``);
* ``inpaint_null``: the same known tokens completed with the null class (unconditional completion, no guidance);
* ``generate_class``: class-conditional generation from nothing (no known tokens), guidance as above;
* ``reconstruction``: the tokenizer's encode → decode of the full image (the ceiling);
* ``kept_half``: the reconstruction with the masked half painted black (what the kept tokens alone show).

Seeds: image ``i`` draws from ``torch.Generator().manual_seed(i)`` in every method (the pipeline derives its
per-image generator from it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from tokenloom.components import component_class
from tokenloom.config import SamplingParams
from tokenloom.data.shapes import COLOR_NAMES, SHAPES, SingleShapeDataset
from tokenloom.evaluation.shapes_judge import judge
from tokenloom.generators.condition import Condition
from tokenloom.pipelines.images import known_token_mask
from tokenloom.pipelines.inpainting import InpaintingPipeline


def load_part(folder: Path, *names: str):
    for name in names:
        path = folder / name
        if (path / "config.json").is_file():
            config = json.loads((path / "config.json").read_text())
            return component_class(config["_class_name"]).from_pretrained(str(path)).eval()
    raise SystemExit(f"--model {folder}: none of {names} holds a config.json")


def accept(images01: torch.Tensor, labels: list[int], with_color: bool) -> list[bool]:
    """Shapes-judge verdict of each ``[N, 3, H, W]`` image in [0, 1] for its label (shape, and colour)."""
    u8 = (images01.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    out = []
    for img, label in zip(u8, labels):
        want = {"class": SHAPES[label // len(COLOR_NAMES)], "count": 1}
        if with_color:
            want["color"] = COLOR_NAMES[label % len(COLOR_NAMES)]
        out.append(bool(judge(np.ascontiguousarray(img), {"include": [want]})[0]))
    return out


def seeds(idx: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in idx]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/shapes_random_order")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("-n", "--num-images", type=int, default=210)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=70)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, load0 = time.time(), os.getloadavg()

    folder = Path(args.model)
    tok = load_part(folder, "image_tokenizer", "tokenizer")
    gen = load_part(folder, "token_generator", "generator")
    pipe = InpaintingPipeline(tok, gen)
    pipe.set_progress_bar_config(disable=True)
    data = SingleShapeDataset("test", image_size=tok.image_size, num_samples=args.num_images, seed=0)
    size = tok.image_size
    repaint = torch.zeros(1, size, size, dtype=torch.bool)
    repaint[:, :, size // 2:] = True
    known_mask = known_token_mask(repaint, tok.spec)
    guided = SamplingParams(guidance_scale=args.guidance, num_steps=args.steps)
    plain = SamplingParams(num_steps=args.steps)

    results: dict[str, list[bool]] = {}
    results_shape: dict[str, list[bool]] = {}
    for lo in range(0, len(data), args.batch):
        idx = list(range(lo, min(lo + args.batch, len(data))))
        real = torch.stack([data[i]["image"] for i in idx])  # [-1, 1]
        labels = [data[i]["label"] for i in idx]
        null = torch.full((len(idx),), gen.config.num_classes)
        with torch.no_grad():
            known = tok.encode(real)
            km = known_mask.expand(len(idx), -1)
            images = {
                "inpaint_class": pipe((real + 1) / 2, repaint[0], class_labels=labels, generator=seeds(idx),
                                      sampling_params=guided, output_type="pt").images,
                "inpaint_null": tok.decode(gen.generate(Condition(labels=null), plain, generator=seeds(idx),
                                                        known=known, known_mask=km)),
                "generate_class": tok.decode(gen.generate(torch.tensor(labels), guided, generator=seeds(idx))),
                "reconstruction": tok.decode(known),
            }
        for name in ("inpaint_null", "generate_class", "reconstruction"):
            images[name] = ((images[name].float() + 1) / 2).clamp(0, 1)
        images["kept_half"] = images["reconstruction"].clone()
        images["kept_half"][:, :, :, size // 2:] = 0
        for name, imgs in images.items():
            results.setdefault(name, []).extend(accept(imgs, labels, True))
            results_shape.setdefault(name, []).extend(accept(imgs, labels, False))

    report = {
        "model": str(folder), "num_images": len(data), "guidance_scale": args.guidance, "num_steps": args.steps,
        "mask": "right half repainted", "known_tokens": int(known_mask.sum()), "tokens": tok.spec.length,
        "accept_shape_and_colour": {k: float(np.mean(v)) for k, v in results.items()},
        "accept_shape_only": {k: float(np.mean(v)) for k, v in results_shape.items()},
        "seconds": round(time.time() - start, 1), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
