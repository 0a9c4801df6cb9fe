"""Write the shapes-GenEval prompt list (GenEval metadata JSONL) from the held-out shapes split.

    python scripts/make_geneval_prompts.py --out geneval_prompts.jsonl [--per-category 100] [--seed 0]
        [--reference-dir DIR --image-size 32]

--reference-dir also writes the data set's own rendering of each prompt's scene in GenEval's
layout (one sample per prompt): the judge's upper bound, scored by scripts/evaluate_geneval.py.
"""

import argparse

from tqdm.auto import tqdm

from tokenloom.data.shapes import CATEGORIES, render_scene
from tokenloom.evaluation.geneval import geneval_metadata, held_out_scenes, write_geneval_sample, write_prompts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="geneval_prompts.jsonl", help="output JSONL file")
    parser.add_argument("--per-category", type=int, default=100, help="prompts per category")
    parser.add_argument("--seed", type=int, default=0, help="shapes data-set seed")
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--reference-dir", default=None, help="also write the reference renders here")
    parser.add_argument("--image-size", type=int, default=32, help="size of the reference renders")
    args = parser.parse_args(argv)
    scenes = held_out_scenes(args.per_category, seed=args.seed, categories=args.categories)
    prompts = [geneval_metadata(s) for s in scenes]
    path = write_prompts(args.out, prompts)
    print(f"wrote {len(prompts)} prompts ({args.per_category} x {len(args.categories)} categories) to {path}")
    if args.reference_dir:
        for i, (scene, meta) in enumerate(tqdm(list(zip(scenes, prompts)), desc="reference renders")):
            write_geneval_sample(args.reference_dir, i, meta, [render_scene(scene, args.image_size)])
        print(f"wrote {len(prompts)} reference renders ({args.image_size}x{args.image_size}) to {args.reference_dir}")


if __name__ == "__main__":
    main()
