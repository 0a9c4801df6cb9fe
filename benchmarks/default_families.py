"""Which generator family for the default text-to-image model? shapes-GenEval vs seconds per image.

Every family is trained by the same recipe machinery (``tokenloom.training.text_to_image``) on the same data, with
the same tokenizer, text conditioner size, width/depth, batch and step budget, then sampled on the same validation
prompt list (the held-out split with a different seed than the reported list) and scored by the shapes judge::

    python -m benchmarks.default_families --tokenizer runs/zoo/vq --workdir runs/default/families \
        --steps 800 --json runs/default/families.json [--families raster_ar masked_ar ...]
    python -m benchmarks.default_families --tokenizer runs/zoo/vq --workdir runs/default/families \
        --json runs/default/families.json --retime        # sampling speed of all folders, same conditions

Output: one JSON row per family: steps, CPU minutes of training, overall and per-category accuracy, seconds per image
(CPU, 1 thread, batch of ``--batch-prompts`` prompts x ``--n-samples``). Families whose tokenizer is missing (next-scale
needs a multi-scale tokenizer: ``--ms-tokenizer``) are reported as not measured, with the reason.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

COMMON = {"width": 128, "depth": 4, "num_heads": 4, "cond_dropout": 0.1}
FAMILIES = {
    "raster_ar": {"name": "raster_ar", "multiple_of": 32},
    "random_order_ar": {"name": "random_order_ar", "multiple_of": 32, "order_signal": "instruction",
                        "instruction_embedding": "rope", "inference_order": "random", "num_steps": 16},
    "masked_ar": {"name": "masked_ar", "head": "categorical", "reveal": "confidence", "num_steps": 8,
                  "buffer_size": 16, "attn_dropout": 0.0, "proj_dropout": 0.0},
    "block_diffusion": {"name": "block_diffusion", "block_size": 8, "multiple_of": 32, "head": "categorical",
                        "num_steps": 4, "reveal": "random", "mask_ratio_min": 0.3, "mask_ratio_max": 0.8,
                        "loss_weighting": "elbo"},
    "next_scale": {"name": "next_scale", "head": "categorical", "head_options": {"bias": True},
                   "attn_l2_norm": True, "init_adaln_gamma": 0.1},
}


def generator_section(family: str, tokenizer) -> dict:
    section = copy.deepcopy(FAMILIES[family])
    if family == "masked_ar":  # encoder/decoder halves of the same total depth
        section.update(encoder_width=COMMON["width"], decoder_width=COMMON["width"], encoder_depth=COMMON["depth"] // 2,
                       decoder_depth=COMMON["depth"] // 2, encoder_num_heads=COMMON["num_heads"],
                       decoder_num_heads=COMMON["num_heads"], cond_dropout=COMMON["cond_dropout"])
    elif family == "next_scale":
        section.update(COMMON, input_dim=tokenizer.config.codebook_dim)
    else:
        section.update(COMMON)
    return section


def run_family(family: str, tokenizer_dir: str, args) -> dict:
    from scripts.generate_geneval import generate
    from tokenloom.evaluation.geneval import make_prompts, score_folder
    from tokenloom.training.generator_trainer import load_tokenizer
    from tokenloom.training.text_to_image import train_text_to_image

    out = os.path.join(args.workdir, family)
    cfg = {
        "tokenizer": {"path": tokenizer_dir},
        "data": {"name": "shapes", "split": "train", "image_size": 32, "num_samples": args.num_samples, "seed": 0},
        "conditioner": {"context_length": 16, "width": 128, "heads": 4, "layers": 2},
        "generator": generator_section(family, load_tokenizer(tokenizer_dir)),
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-3, "warmup_steps": 50,
                  "weight_decay": 0.05, "seed": 0, "threads": 1, "log_every": 50, "progress": False},
        "sampling": {"guidance_scale": args.guidance_scale},
    }
    cpu = time.process_time()
    pipe = train_text_to_image(cfg, out, progress=False)
    cpu_minutes = (time.process_time() - cpu) / 60
    with open(os.path.join(out, "train_log.json")) as f:
        log = json.load(f)
    prompts = make_prompts(args.per_category, seed=args.prompt_seed)
    samples = os.path.join(out, "geneval_val")
    spi = generate(pipe, prompts, samples, args.n_samples, args.batch_prompts, seed=0, progress=False)
    report = score_folder(samples, progress=False)
    return {"family": family, "measured": True, "steps": log["steps"], "train_wall_minutes": log["minutes"],
            "cpu_minutes_incl_pretokenize": cpu_minutes, "final_loss": log["rounds"][-1]["history"][-1]["loss"],
            "overall": report["overall"], "per_category": report["per_category"], "seconds_per_image": spi,
            "params_generator": sum(p.numel() for p in pipe.token_generator.parameters()),
            "sampling": {"guidance_scale": args.guidance_scale}, "tokenizer": tokenizer_dir}


def retime(args) -> None:
    """Re-time sampling of the trained folders under the same conditions: every repeat samples every family in
    turn (so load changes hit all alike), 1 thread, the same 12 validation prompts x ``--n-samples``; the median
    seconds per image replaces each row's ``seconds_per_image`` (the in-run figure stays as
    ``seconds_per_image_in_run``)."""
    import statistics

    import tokenloom
    from tokenloom.evaluation.geneval import make_prompts

    with open(args.json) as f:
        rows = json.load(f)
    prompts = [m["prompt"] for m in make_prompts(2, seed=args.prompt_seed)]
    pipes = {r["family"]: tokenloom.pipeline("text-to-image", model=os.path.join(args.workdir, r["family"]))
             for r in rows if r.get("measured")}
    times = {f: [] for f in pipes}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe(prompts[:2], generator=torch.Generator().manual_seed(0))  # warm-up
    for _ in range(args.repeats):
        for family, pipe in pipes.items():
            start = time.perf_counter()
            pipe(prompts, num_images_per_prompt=args.n_samples, generator=torch.Generator().manual_seed(0))
            times[family].append((time.perf_counter() - start) / (len(prompts) * args.n_samples))
    for r in rows:
        if r["family"] in times:
            r.setdefault("seconds_per_image_in_run", r["seconds_per_image"])
            r["seconds_per_image"] = statistics.median(times[r["family"]])
            print(r["family"], f"{r['seconds_per_image']:.4f} s/image", flush=True)
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="VQ tokenizer folder (8x8 index tokens)")
    parser.add_argument("--ms-tokenizer", default=None, help="multi-scale tokenizer folder for next_scale")
    parser.add_argument("--workdir", default="runs/default/families")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--per-category", type=int, default=20, help="validation prompts per category")
    parser.add_argument("--prompt-seed", type=int, default=1, help="held-out split seed (the reported list uses 0)")
    parser.add_argument("--n-samples", type=int, default=2)
    parser.add_argument("--batch-prompts", type=int, default=16)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--json", default=None, help="append-safe JSON list of rows")
    parser.add_argument("--retime", action="store_true",
                        help="only re-time sampling of the folders in --workdir, interleaved (updates --json)")
    parser.add_argument("--repeats", type=int, default=3, help="--retime repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.retime:
        return retime(args)
    rows = []
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            rows = [r for r in json.load(f) if r["family"] not in args.families]
    for family in args.families:
        tok = args.ms_tokenizer if family == "next_scale" else args.tokenizer
        if tok is None:
            row = {"family": family, "measured": False,
                   "reason": "needs a multi-scale tokenizer (--ms-tokenizer); none was trained"}
        else:
            try:
                row = run_family(family, tok, args)
            except Exception as exc:  # a family that fails is a row that says so, not a lost table
                row = {"family": family, "measured": False, "reason": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
