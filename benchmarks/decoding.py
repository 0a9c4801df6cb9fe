"""Decoding algorithms: forward passes and wall time per image (and quality on a trained shapes model), CPU.

Run: ``python -m benchmarks.decoding --json benchmarks/results/decoding.json [--folder runs/shapes_random_order]``.

1. A tiny random RasterAR (16×16 grid, vocabulary 256, width 64, 2 layers, random weights with a sharpened head so
   the conditionals are not uniform): plain raster decoding vs SJD (random and spatial initialisation), LANTERN
   (a random codebook stands in for the tokenizer's), grouped SD and ZipAR.
2. With ``--folder``: a trained generator folder (``generator/`` + ``tokenizer/`` subfolders, e.g. the shapes
   RandomOrderAR of ``runs/``): sequential one-token-per-step decoding vs RandAR's parallel decoding (its config's
   ``num_steps``) vs SJD / LANTERN (the tokenizer's codebook) / grouped SD; quality = the shapes judge's accuracy on
   the class prompt (shape and colour), when the class count is the shapes colour data set's 21.

Forward passes are counted by a hook on the backbone's final norm (one count per backbone call on the batch, the
prefill included) and cross-checked against the decoders' ``last_stats``. Images are generated one at a time
(batch 1): a speculative batch advances at its slowest row's pace, so per-image counts are the honest unit.
Timing: ``torch.set_num_threads(--threads)``; methods take turns within each repeat, so load changes on this shared
machine hit all of them alike; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from tokenloom import generators, tokenizers
from tokenloom.config import SamplingParams
from tokenloom.generators.decoding import LANTERN, SJD, GroupedSD, ZipAR
from tokenloom.tokens import Grid, Tokens, TokenSpec


def tiny_raster(seed: int = 0, sharpness: float = 3.0):
    spec = TokenSpec(kind="index", vocab_size=256, layout=Grid(16, 16))
    torch.manual_seed(seed)
    model = generators.build("raster_ar", token_spec=spec.to_dict(), width=64, depth=2, num_heads=4, multiple_of=32,
                             num_classes=10)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 2 and "embedding" not in name and "null" not in name:
                scale = sharpness if name.startswith("output_head") else 1.0
                p.copy_(scale * noise / p.shape[1] ** 0.5)
            else:
                p.copy_(noise)
    return model.eval()


def load_folder(folder: Path):
    def build(registry, sub):
        name = json.loads((folder / sub / "config.json").read_text())["_class_name"]
        for key in registry.available():
            cls = registry.get(key)
            if cls.__name__ == name:
                return cls.from_pretrained(folder / sub).eval()
        raise ValueError(f"no registered class named {name!r} for {folder / sub}")

    return build(generators.GENERATORS, "generator"), build(tokenizers.TOKENIZERS, "tokenizer")


def codebook_of(tokenizer) -> torch.Tensor:
    """``[V, D]`` code embeddings through the tokenizer contract (``embed``)."""
    spec = tokenizer.spec
    v, length = spec.vocab_size, spec.length
    codes = torch.arange(-(-v // length) * length) % v
    with torch.no_grad():
        emb = tokenizer.embed(Tokens(codes.view(-1, length, 1), spec))
    return emb.reshape(-1, emb.shape[-1])[:v].float()


class PassCounter:
    def __init__(self, model):
        self.count = 0
        self.handle = model.norm.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def run_methods(model, methods: dict, labels: list[int], params: SamplingParams, repeats: int, judge_fn=None):
    counter = PassCounter(model)
    results = {name: {"passes": [], "seconds": [], "correct": []} for name in methods}
    for rep in range(repeats):
        for name, (decoding, extra) in methods.items():
            for i, label in enumerate(labels):
                gen = torch.Generator().manual_seed(1000 * rep + i)
                counter.count = 0
                start = time.perf_counter()
                out = model.generate(torch.tensor([label]), params, gen, decoding=decoding, **extra)
                results[name]["seconds"].append(time.perf_counter() - start)
                results[name]["passes"].append(counter.count)
                if decoding is not None and decoding.last_stats["forward_passes"] != counter.count:
                    raise RuntimeError(f"{name}: hook counted {counter.count} passes, decoder {decoding.last_stats}")
                if judge_fn is not None and rep == 0:
                    results[name]["correct"].append(judge_fn(out, label))
    counter.handle.remove()
    summary = {}
    for name, r in results.items():
        summary[name] = {"passes_per_image": statistics.mean(r["passes"]),
                         "seconds_per_image": statistics.median(r["seconds"])}
        if r["correct"]:
            summary[name]["judge_accuracy"] = statistics.mean(r["correct"])
    base = next(iter(summary.values()))
    for s in summary.values():
        s["passes_ratio"] = s["passes_per_image"] / base["passes_per_image"]
        s["time_ratio"] = s["seconds_per_image"] / base["seconds_per_image"]
    return summary


def shapes_judge(tokenizer):
    from tokenloom.data.shapes import COLOR_NAMES, SHAPES
    from tokenloom.evaluation.shapes_judge import judge

    def score(tokens, label):
        with torch.no_grad():
            image = tokenizer.decode(tokens)[0].clamp(-1, 1)
        arr = ((image.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        shape, color = SHAPES[label // len(COLOR_NAMES)], COLOR_NAMES[label % len(COLOR_NAMES)]
        return float(judge(arr, {"include": [{"class": shape, "count": 1, "color": color}]})[0])

    return score


def print_table(title: str, summary: dict) -> None:
    print(f"\n{title}")
    print(f"{'method':34s} {'passes/img':>10s} {'ratio':>6s} {'s/img':>8s} {'ratio':>6s} {'judge':>6s}")
    for name, s in summary.items():
        judge = f"{s['judge_accuracy']:.2f}" if "judge_accuracy" in s else "-"
        print(f"{name:34s} {s['passes_per_image']:10.1f} {s['passes_ratio']:6.2f} {s['seconds_per_image']:8.3f} "
              f"{s['time_ratio']:6.2f} {judge:>6s}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, default=None, help="trained generator folder (generator/ + tokenizer/)")
    ap.add_argument("--images", type=int, default=8, help="images per method (tiny model)")
    ap.add_argument("--trained-images", type=int, default=21, help="images per method (trained model)")
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--delta", type=float, default=0.1)
    ap.add_argument("--guidance", type=float, default=1.0, help="guidance scale for the trained model")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w, delta = args.window, args.delta
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "load_before": os.getloadavg()}

    model = tiny_raster()
    codebook = torch.randn(256, 8, generator=torch.Generator().manual_seed(1))
    methods = {
        "raster (plain)": (None, {}),
        f"SJD W={w} random init": (SJD(w), {}),
        f"SJD W={w} spatial init": (SJD(w, "spatial"), {}),
        f"LANTERN W={w} k=8 delta={delta}": (LANTERN(codebook, k=8, delta=delta, window=w), {}),
        f"GSD W={w} delta={delta}": (GroupedSD(delta=delta, window=w), {}),
        "ZipAR W=4": (ZipAR(4), {}),
        "ZipAR W=8": (ZipAR(8), {}),
    }
    labels = [i % 10 for i in range(args.images)]
    report["tiny_raster"] = run_methods(model, methods, labels, SamplingParams(), args.repeats)
    print_table("tiny random RasterAR (16x16, V=256), batch 1", report["tiny_raster"])

    if args.folder is not None:
        gen_model, tokenizer = load_folder(args.folder)
        length = gen_model.spec.length
        cb = codebook_of(tokenizer)
        params = SamplingParams(guidance_scale=args.guidance)
        seq = {"order": "random"}
        methods = {f"sequential (1 token/pass, L={length})": (None, {"tokens_per_step": [1] * length, **seq})}
        if type(gen_model).registry_name == "random_order_ar":
            methods[f"RandAR parallel ({gen_model.config.num_steps} steps)"] = (None, seq)
            extra = seq
        else:
            extra = {}
            methods = {"raster (plain)": (None, {})}
        methods.update({
            f"SJD W={w} random init": (SJD(w), extra),
            f"SJD W={w} spatial init": (SJD(w, "spatial"), extra),
            f"LANTERN W={w} k=8 delta={delta}": (LANTERN(cb, k=8, delta=delta, window=w), extra),
            f"GSD W={w} delta={delta}": (GroupedSD(delta=delta, window=w), extra),
        })
        if type(gen_model).registry_name == "raster_ar":
            methods["ZipAR W=4"] = (ZipAR(4), {})
        n_classes = gen_model.config.num_classes or 1
        labels = [i % n_classes for i in range(args.trained_images)]
        judge_fn = shapes_judge(tokenizer) if n_classes == 21 else None
        report["trained"] = {"folder": str(args.folder),
                             "results": run_methods(gen_model, methods, labels, params, args.repeats, judge_fn)}
        print_table(f"trained {type(gen_model).__name__} from {args.folder} (guidance {args.guidance}), batch 1",
                    report["trained"]["results"])
    report["load_after"] = os.getloadavg()
    print(f"\nload average before {report['load_before']}, after {report['load_after']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
