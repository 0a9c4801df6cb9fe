"""Generation cost of every family at a LlamaGen-B-like size on CPU: forward passes per image and images/s.

Run: ``python -m benchmarks.generate [--md benchmarks/results/generate.md] [--json out.json]``
(defaults: width 768, depth 12, 12 heads, vocab 16,384, a 16 × 16 grid = 256 tokens, class-conditional with
classifier-free guidance 2.0 — so every pass runs 2B rows —, random weights, ``torch.set_num_threads(--threads)``).

What is measured:

* **Forward passes per image**: calls of the backbone's first transformer block during one ``generate`` (a forward
  pre-hook; guidance rows ride in the same pass), next to what the method promises: raster ``L``, random-order AR
  its decoding steps, masked AR ``num_steps``, next-scale the number of scales, block diffusion blocks × steps.
* **images/s** of one ``generate`` call of ``B`` images (batch 1 and 8) after a short warm-up, wall clock.
* Raster AR, the brief's full grid: KV cache on/off × eager/``torch.compile`` × batch 1/8. "No cache" recomputes the
  whole sequence at every step (``RasterAR.hidden`` over prefix + tokens so far, what an implementation without a
  cache does); timing all 256 growing passes would take tens of minutes here, so the time per image is **estimated**:
  full passes are timed at a few lengths ``t`` and the cost of all ``L`` passes is integrated linearly between
  them (marked "est."; with ``torch.compile`` at batch 1 only). ``torch.compile`` compiles each transformer block
  (``nn.Module.compile(dynamic=True)``: the KV length and batch vary); compile + warm-up time is reported on its own,
  not in images/s.
* The other families: cached (where the method has a cache) and eager, batch 1 by default (``--other-batches``) —
  masked AR recomputes all 256 positions at each of its steps, so batch 8 alone takes minutes on this machine.

Sizes (random weights, about 100M parameters each): raster / random-order / block diffusion are the LlamaGen-B decoder
(SwiGLU, ``multiple_of=256``); masked AR is a 6 + 6-block ViT encoder/decoder of width 768 with a categorical head
(MaskGIT-style, 8 steps); next-scale is VAR-d12-like (width 768, 12 adaLN blocks) over VAR's 10 scales up to 16 × 16
(680 tokens), with a tiny random multi-scale VQ tokenizer (16,384 codes) supplying the next-scale inputs; block
diffusion uses blocks of 16 tokens and 4 masked-diffusion steps per block.

Measurements run in the order of :func:`plan` (every family at batch 1 first, the raster variants after) and the
results files are rewritten after each one, so a run stopped early on this shared machine still reports what it
measured and lists what it did not.

Absolute numbers depend on the load of this shared 2-core machine (recorded before and after); ratios between rows
of one run are what to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager

import torch

from tokenloom import generators, tokenizers
from tokenloom.config import SamplingParams
from tokenloom.tokens import Grid, Scales, TokenSpec

WIDTH, DEPTH, HEADS, VOCAB, GRID, CLASSES = 768, 12, 12, 16_384, 16, 1000
VAR_SCALES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
GUIDANCE = 2.0
# --smoke: a tiny size that runs every code path in seconds (for checking the script, not for numbers)
SMOKE = dict(WIDTH=64, DEPTH=2, HEADS=4, VOCAB=256, GRID=4, VAR_SCALES=(1, 2, 4))


def build(family: str):
    """→ (model, SamplingParams, promised passes per generate, description)."""
    LLAMA = dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, multiple_of=256, condition="class", num_classes=CLASSES)
    grid = TokenSpec(kind="index", vocab_size=VOCAB, layout=Grid(GRID, GRID)).to_dict()
    length = GRID * GRID
    torch.manual_seed(0)
    if family == "raster_ar":
        model = generators.build("raster_ar", token_spec=grid, **LLAMA)
        return model, SamplingParams(guidance_scale=GUIDANCE), length, f"L = {length} positions"
    if family == "random_order_ar":
        steps = min(64, length)
        model = generators.build("random_order_ar", token_spec=grid, **LLAMA)
        return model, SamplingParams(guidance_scale=GUIDANCE, num_steps=steps), steps, f"{steps} decoding steps"
    if family == "masked_ar":
        steps = min(8, length)
        model = generators.build("masked_ar", token_spec=grid, encoder_width=WIDTH, encoder_depth=6,
                                 encoder_num_heads=HEADS, decoder_width=WIDTH, decoder_depth=6,
                                 decoder_num_heads=HEADS, buffer_size=64, attn_dropout=0.0, proj_dropout=0.0,
                                 condition="class", num_classes=CLASSES, head="categorical")
        return model, SamplingParams(guidance_scale=GUIDANCE, num_steps=steps), steps, f"num_steps = {steps}"
    if family == "next_scale":
        tok = tokenizers.build("msvq", image_size=GRID * 2, ch=8, ch_mult=[1, 2], num_res_blocks=1, z_channels=8,
                               norm_groups=4, codebook_size=VOCAB, codebook_dim=8, scales=list(VAR_SCALES)).eval()
        spec = tok.spec
        assert spec.layout == Scales(tuple((s, s) for s in VAR_SCALES))
        model = generators.build("next_scale", token_spec=spec.to_dict(), input_dim=8, width=WIDTH, depth=DEPTH,
                                 num_heads=HEADS, condition="class", num_classes=CLASSES)
        model.bind_tokenizer(tok)
        k = len(VAR_SCALES)
        return model, SamplingParams(guidance_scale=GUIDANCE), k, f"{k} scales ({spec.length} tokens)"
    if family == "block_diffusion":
        block, steps = min(16, length), 4
        model = generators.build("block_diffusion", token_spec=grid, block_size=block, head="categorical", **LLAMA)
        blocks = length // block
        return (model, SamplingParams(guidance_scale=GUIDANCE, num_steps=steps), blocks * steps,
                f"{blocks} blocks × {steps} steps")
    raise ValueError(f"unknown family {family!r}")


def first_block(model: torch.nn.Module) -> torch.nn.Module:
    """The first transformer block in module order (one call per backbone forward pass)."""
    for m in model.modules():
        if m is not model and type(m).__name__.endswith("Block"):
            return m
    raise ValueError(f"{type(model).__name__} has no module named *Block")


@contextmanager
def count_passes(model: torch.nn.Module):
    counter = {"passes": 0}
    handle = first_block(model).register_forward_pre_hook(lambda *_: counter.__setitem__("passes",
                                                                                         counter["passes"] + 1))
    try:
        yield counter
    finally:
        handle.remove()


def labels(batch: int) -> torch.Tensor:
    return torch.arange(batch) % CLASSES


@torch.no_grad()
def time_generate(model, params: SamplingParams, batch: int) -> float:
    start = time.perf_counter()
    model.generate(labels(batch), params, torch.Generator().manual_seed(0))
    return time.perf_counter() - start


@torch.no_grad()
def raster_warm_up(model, batch: int, steps: int = 3) -> float:
    """Prefill + a few cached steps + two uncached passes (triggers compilation of every graph the runs use)."""
    start = time.perf_counter()
    prefix = model.embed_prefix(model.as_condition(labels(batch)), guided=True, drop=False)
    cache = model.new_cache(prefix.x.shape[0])
    model.prefill(prefix, cache)
    codes = torch.zeros(prefix.x.shape[0], 1, dtype=torch.long)
    for _ in range(steps):
        model.step(codes, cache)
    for t in (0, 1, 2, 5):  # uncached passes: sizes 0 and 1 are specialised by the compiler, then dynamic
        model.hidden(prefix, torch.zeros(prefix.x.shape[0], t, dtype=torch.long))
    return time.perf_counter() - start


@torch.no_grad()
def raster_no_cache_seconds(model, batch: int) -> tuple[float, dict]:
    """Estimated seconds of one uncached generation: time full passes over ``t`` tokens (``t`` = 1..L, pass ``t``
    predicts token ``t - 1`` from prefix + ``t - 1`` tokens), integrate linearly over ``t = 1..L``."""
    length = GRID * GRID
    points = sorted({1, length // 2, length})
    prefix = model.embed_prefix(model.as_condition(labels(batch)), guided=True, drop=False)
    measured = {}
    for t in points:
        codes = torch.zeros(prefix.x.shape[0], t - 1, dtype=torch.long)
        start = time.perf_counter()
        z = model.hidden(prefix, codes)
        model.output_head.logits(z[:, -1])
        measured[t] = time.perf_counter() - start
    total, ts = 0.0, sorted(measured)
    for t in range(1, length + 1):
        hi = next(i for i, p in enumerate(ts) if p >= t)
        lo = max(hi - 1, 0)
        a, b = ts[lo], ts[hi]
        w = 0.0 if a == b else (t - a) / (b - a)
        total += (1 - w) * measured[a] + w * measured[b]
    return total, measured


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def plan(args) -> list[tuple]:
    """The measurements in the order they run, cheapest and most telling first, so that a run stopped early (this
    machine is shared) still reports every family: ``(family, batch, cache, compile)``."""
    jobs = [(f, 1, f != "masked_ar", False) for f in args.families]
    if "raster_ar" in args.families:
        jobs += [("raster_ar", b, True, False) for b in args.raster_batches if b != 1]
        if not args.skip_no_cache:
            jobs.append(("raster_ar", 1, False, False))
        if args.compile:
            jobs += [("raster_ar", b, True, True) for b in args.raster_batches]
        if not args.skip_no_cache:
            jobs += [("raster_ar", b, False, False) for b in args.raster_batches if b != 1]
    jobs += [(f, b, f != "masked_ar", False) for f in args.families if f != "raster_ar"
             for b in args.other_batches if b != 1]
    return jobs


def run(args, flush=lambda out: None) -> dict:
    """Run :func:`plan`; ``flush(out)`` is called after every measurement (results are written as they come)."""
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    jobs = plan(args)
    out = {"threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
           "load_before": load(), "load_after": None, "rows": rows,
           "pending": [dict(zip(("family", "batch", "cache", "compile"), j)) for j in jobs]}
    models: dict[str, tuple] = {}

    def record(**row):
        rows.append(row)
        out["pending"].pop(0)
        out["load_after"] = load()
        print(f"{row['family']:16s} cache={row['cache']!s:5s} compile={row['compile']!s:5s} batch={row['batch']} "
              f"passes/image={row.get('passes')} (promised {row.get('promised')}) {row['seconds']:.2f} s "
              f"{row['images_per_s']:.4f} images/s", flush=True)
        flush(out)

    for family, batch, cache, compiled in jobs:
        if family not in models:
            if family != "raster_ar":  # keep at most the raster model and one other in memory
                for name in [n for n in models if n != "raster_ar"]:
                    del models[name]
            model, params, promised, what = build(family)
            model.eval()
            n_params = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
            models[family] = (model, params, promised, what, n_params)
            print(f"{family}: {n_params}M parameters, promised {what}", flush=True)
        model, params, promised, what, n_params = models[family]
        common = dict(family=family, params_m=n_params, cache=cache, compile=compiled, batch=batch,
                      promised=promised, promised_what=what)
        if compiled and not getattr(model, "_benchmark_compiled", False):
            start = time.perf_counter()
            for layer in model.layers:
                layer.compile(dynamic=True)
            model._benchmark_compiled = True
            raster_warm_up(model, batch)
            out["compile_warmup_seconds"] = {str(batch): time.perf_counter() - start}
        elif compiled:
            out["compile_warmup_seconds"][str(batch)] = raster_warm_up(model, batch)
        elif family == "raster_ar" and cache:
            raster_warm_up(model, batch)
        if family == "raster_ar" and not cache:
            seconds, measured = raster_no_cache_seconds(model, batch)
            record(**common, passes=GRID * GRID, seconds=seconds, images_per_s=batch / seconds, estimated=True,
                   full_pass_seconds={str(k): v for k, v in measured.items()})
            continue
        with count_passes(model) as counter:
            seconds = time_generate(model, params, batch)
        record(**common, passes=counter["passes"] if not compiled else None, seconds=seconds,
               images_per_s=batch / seconds)
    out["load_after"] = load()
    return out


def markdown(out: dict, command: str) -> str:
    lines = [
        "# Generation cost per family (CPU)",
        "",
        f"Command: `{command}` — torch {out['torch']}, {out['threads']} thread(s), load average before "
        f"{out['load_before']}, after {out['load_after']}. Random weights; classifier-free guidance 2.0 (2B rows per "
        "pass). See `benchmarks/generate.py` for what each column means.",
        "",
        "| family | params | KV cache | torch.compile | batch | passes / image (measured) | promised | s / batch | "
        "images/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        est = " (est.)" if r.get("estimated") else ""
        passes = r["passes"] if r["passes"] is not None else "(as eager)"
        lines.append(f"| {r['family']} | {r['params_m']}M | {'yes' if r['cache'] else 'no'} | "
                     f"{'yes' if r['compile'] else 'no'} | {r['batch']} | {passes} | {r['promised']} "
                     f"({r['promised_what']}) | {r['seconds']:.2f}{est} | {r['images_per_s']:.4f}{est} |")
    if out.get("pending"):
        lines += ["", "Not measured (the run was stopped before reaching them): " + "; ".join(
            f"{p['family']} batch {p['batch']}, cache {'yes' if p['cache'] else 'no'}, compile "
            f"{'yes' if p['compile'] else 'no'}" for p in out["pending"]) + "."]
    if out.get("compile_warmup_seconds"):
        lines += ["", "torch.compile: compile + warm-up seconds per batch size (not in the timings above): "
                  + ", ".join(f"batch {b}: {s:.1f}" for b, s in out["compile_warmup_seconds"].items()) + "."]
    est = [r for r in out["rows"] if r.get("estimated")]
    if est:
        lines += ["", "(est.) Uncached raster generation is estimated from full passes timed at t tokens "
                  f"(integrated linearly over t = 1..{est[0]['promised']}):", ""]
        for r in est:
            pts = ", ".join(f"t={t}: {s:.3f} s" for t, s in r["full_pass_seconds"].items())
            lines.append(f"- batch {r['batch']}, compile={'yes' if r['compile'] else 'no'}: {pts}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["raster_ar", "random_order_ar", "masked_ar", "next_scale",
                                                          "block_diffusion"])
    parser.add_argument("--raster-batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--other-batches", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--skip-no-cache", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs (numbers meaningless)")
    args = parser.parse_args(argv)
    if args.smoke:
        globals().update(SMOKE)
    command = ("python -m benchmarks.generate " + " ".join(argv if argv is not None else sys.argv[1:])).strip()

    def flush(out):
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        if args.md:
            with open(args.md, "w") as f:
                f.write(markdown(out, command))

    out = run(args, flush)
    flush(out)
    print(markdown(out, command))


if __name__ == "__main__":
    main()
