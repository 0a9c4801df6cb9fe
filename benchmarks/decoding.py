"""Decoding algorithms: forward passes and wall time per image (and quality on a trained shapes model), CPU.

Run: ``python -m benchmarks.decoding --json benchmarks/results/decoding.json [--folder runs/shapes_random_order]``;
text-to-image: ``python -m benchmarks.decoding --skip-tiny --folder tokenloom/assets/default/text-to-image
--json benchmarks/results/decoding_default.json --txt benchmarks/results/decoding_default.txt``.

1. A tiny random RasterAR (16×16 grid, vocabulary 256, width 64, 2 layers, random weights with a sharpened head so
   the conditionals are not uniform): plain raster decoding vs SJD (random and spatial initialisation), LANTERN
   (a random codebook stands in for the tokenizer's), grouped SD and ZipAR.
2. With ``--folder``: a trained generator folder (``generator/`` + ``tokenizer/`` subfolders, e.g. the shapes
   RandomOrderAR of ``runs/``): sequential one-token-per-step decoding vs RandAR's parallel decoding (its config's
   ``num_steps``) vs SJD / LANTERN (the tokenizer's codebook) / grouped SD; quality = the shapes judge's accuracy on
   the class prompt (shape and colour), when the class count is the shapes colour data set's 21.
3. With ``--folder`` a text-to-image pipeline folder (``model_index.json``, e.g. the packaged default
   ``tokenloom/assets/default/text-to-image``, a RasterAR): prompts from the held-out shapes-GenEval list
   (:func:`tokenloom.evaluation.geneval.make_prompts`, ``--per-category`` per category, list seed ``--prompt-seed``,
   1 = a validation list, not the reported seed-0 list), ``--samples`` images per prompt with generation seed
   ``--seed + index`` (the same seeds for every method); raster sequential vs SJD (W = 4, 8, 16; random and spatial
   init) vs LANTERN (the VQ codebook) vs grouped SD vs ZipAR (W = 2, 4), at the folder's sampling defaults
   (guidance 4.0). Quality = the shapes judge's GenEval accuracy (mean over categories, as
   :func:`tokenloom.evaluation.geneval.summarize`), with its binomial standard error
   ``sqrt(sum_c p_c (1 - p_c) / n_c) / C``. For the exact SJD runs, the acceptance probability
   ``sum_v min(p, q)`` (= 1 - TV(p, q)) of every checked draft is recorded by window offset and by draft kind
   (fresh uniform init, spatial one-hot init, Jacobi iterate), through the ``relax`` hook (which returns ``p``
   unchanged, so the runs stay exact).

Forward passes are counted by a hook on the backbone's final norm (one count per backbone call on the batch, the
prefill included; with guidance the cond + uncond rows go through the backbone as one batch of 2 and count as one
pass, for sequential and speculative decoding alike; one SJD/LANTERN/GSD Jacobi iteration = one pass) and
cross-checked against the decoders' ``last_stats``. Images are generated one at a time
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

import numpy as np
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


class ProbedSJD(SJD):
    """Exact SJD that records each checked draft's acceptance probability ``sum_v min(p, q)`` (``relax`` returns ``p``).

    ``records``: ``{kind: {offset: [sum, count]}}`` with kind ``"uniform init"`` (``q`` uniform), ``"spatial init"``
    (``q`` one-hot) or ``"jacobi"`` (``q`` = the previous iteration's distribution), offset = position in the window.
    """

    def __init__(self, window: int = 8, init: str = "random"):
        super().__init__(window, init)
        self.records: dict = {}

    def relax(self, p, q, drafts):
        accept = torch.minimum(p, q).sum(-1)  # [B, T]
        qmax, qmin = q.amax(-1), q.amin(-1)
        kinds = [("uniform init", (qmax - qmin).abs() < 1e-9), ("spatial init", qmax > 1 - 1e-6)]
        other = ~(kinds[0][1] | kinds[1][1])
        for kind, mask in kinds + [("jacobi", other)]:
            per = self.records.setdefault(kind, {})
            for j in range(accept.shape[1]):
                m = mask[:, j]
                if m.any():
                    rec = per.setdefault(j, [0.0, 0])
                    rec[0] += float(accept[m, j].sum())
                    rec[1] += int(m.sum())
        return p

    def acceptance(self) -> dict:
        """``{kind: {"mean": overall mean, "count": n, "by_offset": [mean per window offset]}}``."""
        out = {}
        for kind, per in self.records.items():
            if not per:
                continue
            total, count = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
            out[kind] = {"mean": total / count, "count": count,
                         "by_offset": [round(per[j][0] / per[j][1], 4) if j in per else None
                                       for j in range(max(per) + 1)]}
        return out


def judge_standard_error(per_category: dict, num_samples: dict) -> float:
    """Binomial standard error of the mean-over-categories accuracy."""
    terms = [p * (1 - p) / num_samples[t] for t, p in per_category.items()]
    return (sum(terms) ** 0.5) / len(terms)


def text_to_image_methods(codebook: torch.Tensor, delta: float) -> dict:
    methods = {"raster sequential (1 token/pass)": None}
    for w in (4, 8, 16):
        for init in ("random", "spatial"):
            methods[f"SJD W={w} {init} init"] = ProbedSJD(w, init)
    methods[f"LANTERN W=16 k=8 delta={delta}"] = LANTERN(codebook, k=8, delta=delta, window=16)
    methods[f"GSD W=16 delta={delta}"] = GroupedSD(delta=delta, window=16)
    methods["ZipAR W=2"] = ZipAR(2)
    methods["ZipAR W=4"] = ZipAR(4)
    return methods


def run_text_to_image(args, methods=None, params=None) -> dict:
    """Section 3 of the module docstring: every method on the held-out shapes prompts, batch 1, methods in turn."""
    import tokenloom
    from tokenloom.evaluation.geneval import make_prompts, summarize
    from tokenloom.evaluation.shapes_judge import judge
    from tokenloom.pipelines.conditions import prepare_condition

    pipe = tokenloom.load(str(args.folder))
    pipe.set_progress_bar_config(disable=True)
    model = pipe.token_generator.eval()
    if type(model).registry_name != "raster_ar":
        raise ValueError(f"--folder {args.folder}: the text-to-image benchmark expects a RasterAR generator, "
                         f"got {type(model).__name__}")
    params = params or pipe.sampling_params()
    if methods is None:
        methods = text_to_image_methods(codebook_of(pipe.image_tokenizer), args.delta)
    prompts = make_prompts(args.per_category, seed=args.prompt_seed)
    _, make = prepare_condition(pipe, prompt=[m["prompt"] for m in prompts])
    counter = PassCounter(model)
    rec = {name: {"passes": [], "seconds": [], "results": []} for name in methods}
    start_all = time.perf_counter()
    with torch.no_grad():
        for i, meta in enumerate(prompts):
            cond = make(torch.tensor([i]))
            for k in range(args.samples):
                seed = args.seed + i * args.samples + k
                for name, decoding in methods.items():
                    counter.count = 0
                    start = time.perf_counter()
                    tokens = model.generate(cond, params, [torch.Generator().manual_seed(seed)], decoding=decoding)
                    rec[name]["seconds"].append(time.perf_counter() - start)
                    rec[name]["passes"].append(counter.count)
                    if decoding is not None and decoding.last_stats["forward_passes"] != counter.count:
                        raise RuntimeError(f"{name}: hook counted {counter.count} passes, decoder "
                                           f"{decoding.last_stats}")
                    image = pipe.tokens_to_output(tokens, "pil", True).images[0]
                    correct, reason = judge(np.asarray(image), meta)
                    rec[name]["results"].append({"index": i, "sample": k, "tag": meta["tag"],
                                                 "correct": bool(correct)})
            if (i + 1) % 10 == 0:
                print(f"  {i + 1}/{len(prompts)} prompts, {time.perf_counter() - start_all:.0f} s", flush=True)
    counter.handle.remove()
    summary = {}
    for name, r in rec.items():
        scored = summarize(r["results"])
        se = judge_standard_error(scored["per_category"], scored["num_samples"])
        summary[name] = {"passes_per_image": statistics.mean(r["passes"]),
                         "passes_min_max": [min(r["passes"]), max(r["passes"])],
                         "seconds_per_image": statistics.median(r["seconds"]),
                         "judge_accuracy": scored["overall"], "judge_se": se,
                         "per_category": scored["per_category"], "images": len(r["results"])}
        if isinstance(methods[name], ProbedSJD):
            summary[name]["acceptance"] = methods[name].acceptance()
    base = next(iter(summary.values()))
    for s in summary.values():
        s["passes_ratio"] = s["passes_per_image"] / base["passes_per_image"]
        s["time_ratio"] = s["seconds_per_image"] / base["seconds_per_image"]
        s["judge_diff_vs_first"] = s["judge_accuracy"] - base["judge_accuracy"]
        s["judge_diff_se"] = (s["judge_se"] ** 2 + base["judge_se"] ** 2) ** 0.5
    return {"folder": str(args.folder), "params": repr(params), "prompts": len(prompts),
            "per_category": args.per_category, "samples_per_prompt": args.samples, "prompt_seed": args.prompt_seed,
            "generation_seed": args.seed, "tokens_per_image": model.spec.length,
            "seconds_total": time.perf_counter() - start_all, "results": summary}


def format_text_to_image(report: dict) -> str:
    lines = [f"text-to-image {report['folder']} ({report['params']}), batch 1; {report['prompts']} held-out prompts "
             f"({report['per_category']}/category, list seed {report['prompt_seed']}) x {report['samples_per_prompt']}"
             f" sample(s), {report['tokens_per_image']} tokens/image",
             f"{'method':34s} {'passes/img':>10s} {'ratio':>6s} {'s/img':>7s} {'ratio':>6s} {'judge':>6s} "
             f"{'+-se':>5s} {'diff':>6s} {'+-se':>5s}"]
    for name, s in report["results"].items():
        lines.append(f"{name:34s} {s['passes_per_image']:10.1f} {s['passes_ratio']:6.2f} {s['seconds_per_image']:7.3f} "
                     f"{s['time_ratio']:6.2f} {s['judge_accuracy']:6.3f} {s['judge_se']:5.3f} "
                     f"{s['judge_diff_vs_first']:+6.3f} {s['judge_diff_se']:5.3f}")
    lines.append("SJD acceptance probability sum_v min(p, q) of checked drafts (mean; by window offset 0..):")
    for name, s in report["results"].items():
        for kind, a in s.get("acceptance", {}).items():
            offs = " ".join(f"{x:.2f}" for x in a["by_offset"][:16] if x is not None)
            lines.append(f"  {name:24s} {kind:13s} n={a['count']:6d} mean={a['mean']:.3f}  [{offs}]")
    return "\n".join(lines)


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
    ap.add_argument("--txt", type=Path, default=None, help="also write the printed tables here")
    ap.add_argument("--skip-tiny", action="store_true", help="skip the tiny random model section")
    ap.add_argument("--per-category", type=int, default=25, help="text-to-image: held-out prompts per category")
    ap.add_argument("--samples", type=int, default=1, help="text-to-image: images per prompt")
    ap.add_argument("--prompt-seed", type=int, default=1, help="text-to-image: prompt-list seed (1 = validation)")
    ap.add_argument("--seed", type=int, default=1, help="text-to-image: generation seed of prompt 0")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "load_before": os.getloadavg()}

    text = []
    if args.folder is not None and (args.folder / "model_index.json").exists():
        report["text_to_image"] = run_text_to_image(args)
        text.append(format_text_to_image(report["text_to_image"]))
        print(text[-1])
    else:
        run_class_sections(args, report)
    report["load_after"] = os.getloadavg()
    text.append(f"load average before {report['load_before']}, after {report['load_after']}")
    print(text[-1])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.txt is not None:
        args.txt.write_text("\n\n".join(text) + "\n")


def run_class_sections(args, report) -> None:
    """Sections 1 and 2 of the module docstring (tiny random model; class-conditional folder)."""
    w, delta = args.window, args.delta
    if not args.skip_tiny:
        tiny_section(args, report)
    if args.folder is None:
        return
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


def tiny_section(args, report) -> None:
    """Section 1: the tiny random RasterAR."""
    w, delta = args.window, args.delta
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


if __name__ == "__main__":
    main()
