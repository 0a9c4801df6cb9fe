"""Sample a text-to-image pipeline for a GenEval prompt file into GenEval's folder layout.

    python scripts/generate_geneval.py --model DIR --prompts prompts.jsonl --outdir OUT [--n-samples 4]

OUT/<index:05d>/metadata.jsonl + OUT/<index:05d>/samples/<k:04d>.png: the layout both the real GenEval
evaluator (on a GPU machine) and ``scripts/evaluate_geneval.py`` (the shapes judge, here) read.
Prompt ``i``'s images use seed ``seed + i`` (one generator per prompt, split into one per sample), so a
prompt's images do not depend on the batch they were drawn in. Without ``--prompts`` the held-out shapes
prompt list is generated (100 per category).
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm.auto import tqdm

import tokenloom
from tokenloom.evaluation.geneval import make_prompts, read_prompts, write_geneval_sample


def generate(pipe, prompts: list[dict], outdir: str, n_samples: int = 4, batch_prompts: int = 16, seed: int = 0,
             progress: bool = True, **call_kwargs) -> float:
    """Write every prompt's samples; returns seconds per image."""
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    for lo in tqdm(range(0, len(prompts), batch_prompts), desc="geneval prompts", disable=not progress):
        chunk = prompts[lo:lo + batch_prompts]
        gens = []
        for i in range(lo, lo + len(chunk)):
            g = torch.Generator().manual_seed(seed + i)
            gens += [torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
                     for _ in range(n_samples)]
        images = pipe([m["prompt"] for m in chunk], num_images_per_prompt=n_samples, generator=gens,
                      output_type="pil", **call_kwargs).images
        for j, meta in enumerate(chunk):
            write_geneval_sample(outdir, lo + j, meta, images[j * n_samples:(j + 1) * n_samples])
    return (time.perf_counter() - start) / max(1, len(prompts) * n_samples)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="text-to-image pipeline folder (default: packaged model)")
    parser.add_argument("--prompts", default=None, help="GenEval-format JSONL prompt file")
    parser.add_argument("--per-category", type=int, default=100, help="prompts per category without --prompts")
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--n-samples", type=int, default=4)
    parser.add_argument("--batch-prompts", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--num-candidates", type=int, default=None,
                        help="candidates per image for the pipeline's scorer to choose from (default: the folder's)")
    parser.add_argument("--scorer", default=None, help="scorer folder to rerank with (replaces the pipeline's)")
    args = parser.parse_args(argv)
    prompts = read_prompts(args.prompts) if args.prompts else make_prompts(args.per_category)
    pipe = tokenloom.pipeline("text-to-image", model=args.model)
    if args.scorer:
        from tokenloom.scoring import SCORERS

        pipe = type(pipe).from_pipe(pipe, scorer=SCORERS.load(args.scorer))
    spi = generate(pipe, prompts, args.outdir, args.n_samples, args.batch_prompts, args.seed,
                   guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                   num_candidates=args.num_candidates)
    print(f"wrote {len(prompts)} prompts x {args.n_samples} samples to {args.outdir} ({spi:.3f} s/image)")


if __name__ == "__main__":
    main()
