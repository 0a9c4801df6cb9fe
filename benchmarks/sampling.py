"""Sampling step speed: guidance + temperature + top-k + top-p + draw, ours vs the usual ways, CPU.

Run: ``python -m benchmarks.sampling --json out.json [--plot out.png]``.

Workloads (all with a guidance pair, scale 1.5, temperature 1.0, top_k 900, top_p 0.96): the main one,
32 rows × V = 16,384; V = 4,096 and 65,536 (32 rows); a single row (V = 16,384); and the main shape with
top-p alone (top_k 0: no top-k to bound the candidates). Methods:

* ``hf_warpers`` (a): Hugging Face transformers' logits processors as ``generate`` chains them —
  ``ClassifierFreeGuidanceLogitsProcessor`` (log-softmax both, mix), ``TemperatureLogitsWarper``,
  ``TopKLogitsWarper``, ``TopPLogitsWarper`` — then softmax and ``torch.multinomial``. transformers is not a
  dependency, so the chain is re-implemented here line for line (same ops, same order).
* ``sort_filter`` (b): the LlamaGen/VAR recipe — mix, divide, ``topk`` threshold, full ``sort`` + softmax +
  cumsum for top-p, softmax, ``torch.multinomial``.
* ``amax_floor`` (c): one ``amax`` pass over the logits the sampler is given — ``cond`` and ``uncond``
  (``[B, V]`` each) on the guided workloads — the floor a fused kernel aims at: any sampler reads its
  whole input once. ``amax_cond`` (c'), one ``amax`` over ``cond`` alone, reads half of a guided sampler's
  input; it is reported beside it (the sessions before 2026-12 used it as the floor).
* ours: ``reference`` (the plain yardstick), ``torch`` (the fast torch path), ``torch_compiled`` (its
  elementwise stages through ``torch.compile``; compile time is reported separately, not timed), ``numba``
  (the fused CPU kernel, ``tokenloom[fast]``; skipped when numba is absent; compiled and cached on first use,
  before timing).

Timing: ``torch.set_num_threads(--threads)`` (default 2); every repeat runs every method once, in turn, so
load changes on this shared machine hit all of them alike; the reported time is the median over
``--repeats``, and ratios are taken between medians. The main workload is measured ``--rounds`` times
(default 5): the amax floor is purely memory-bound and moves up to 2× between rounds on this shared host,
so its ratios are reported per round and as their median. The numba kernel runs on one thread (its module
docstring says why); with ``--threads 2`` torch's ``amax`` uses both cores, so the bar is read at
``--threads 1``. Two clocks are recorded for every call: wall time,
and the process's CPU time (it leaves out time spent waiting for a core, which dominates when other
jobs keep both cores busy, but counts every thread's work, including OpenMP spinning). The load
average before and after is recorded: absolute times move between runs; ratios move much less.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from tokenloom import kernels
from tokenloom.config import SamplingParams

SCALE, TEMPERATURE, TOP_K, TOP_P = 1.5, 1.0, 900, 0.96
WORKLOADS = {  # name: (rows, vocab, top_k)
    "main": (32, 16_384, TOP_K), "V=4096": (32, 4_096, TOP_K), "V=65536": (32, 65_536, TOP_K),
    "single row": (1, 16_384, TOP_K), "top-p only": (32, 16_384, 0),
}


# ---- (a) transformers' processors, re-implemented op for op ----

def hf_warpers(cond: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator, top_k: int) -> torch.Tensor:
    scores = F.log_softmax(torch.cat([cond, uncond]), dim=-1)  # ClassifierFreeGuidanceLogitsProcessor
    c, u = scores.split(cond.shape[0], dim=0)
    scores = u + (c - u) * SCALE
    scores = scores / TEMPERATURE  # TemperatureLogitsWarper
    if top_k > 0:  # TopKLogitsWarper (generate() adds it only for top_k > 0)
        top_k = min(top_k, scores.size(-1))
        remove = scores < torch.topk(scores, top_k)[0][..., -1, None]
        scores = scores.masked_fill(remove, -float("inf"))
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)  # TopPLogitsWarper
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1 - TOP_P)
    sorted_remove[..., -1:] = 0
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    scores = scores.masked_fill(remove, -float("inf"))
    probs = F.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ---- (b) the reference repositories' sort-based filter ----

def sort_filter(cond: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator, top_k: int) -> torch.Tensor:
    logits = uncond + (cond - uncond) * SCALE
    logits = logits / max(TEMPERATURE, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    sorted_remove = cumulative > TOP_P
    sorted_remove[..., 1:] = sorted_remove[..., :-1].clone()
    sorted_remove[..., 0] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    logits = logits.masked_fill(remove, -float("inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


def amax_floor(cond: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator, top_k: int) -> torch.Tensor:
    return cond.amax(dim=-1), uncond.amax(dim=-1)


def amax_cond(cond: torch.Tensor, uncond: torch.Tensor, generator: torch.Generator, top_k: int) -> torch.Tensor:
    return cond.amax(dim=-1)


def ours(backend: str):
    def run(cond, uncond, generator, top_k):
        params = SamplingParams(temperature=TEMPERATURE, top_k=top_k, top_p=TOP_P, guidance_scale=SCALE)
        return kernels.sample(cond, params, generator, uncond_logits=uncond, backend=backend)

    return run


METHODS = {
    "hf_warpers": hf_warpers,
    "sort_filter": sort_filter,
    "amax_floor": amax_floor,
    "amax_cond": amax_cond,
    "reference": ours("reference"),
    "torch": ours("torch"),
    "torch_compiled": ours("torch-compiled"),
    "numba": ours("numba"),
}


def measure(rows: int, vocab: int, top_k: int, methods: dict, repeats: int,
            seed: int = 0) -> dict[str, dict[str, float]]:
    """Median seconds per call of each method on one workload, by wall clock and by process CPU time
    (methods interleaved within every repeat)."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(rows, vocab, generator=g) * 4, torch.randn(rows, vocab, generator=g) * 4
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():  # warm-up (and compile)
        fn(cond, uncond, torch.Generator().manual_seed(0), top_k)
    for r in range(repeats):
        for name, fn in methods.items():
            gen = torch.Generator().manual_seed(r)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(cond, uncond, gen, top_k)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return {clock: {name: statistics.median(t) for name, t in times.items()}
            for clock, times in (("wall", wall), ("cpu", cpu))}


def ratios(med: dict[str, float]) -> dict[str, float]:
    """Speedups of ours over (a) and (b), and our time over the floor (c)."""
    out = {}
    for ours_name in ("torch", "torch_compiled", "numba"):
        if ours_name in med:
            out[f"{ours_name} vs hf_warpers (speedup, bar >= 5)"] = med["hf_warpers"] / med[ours_name]
            out[f"{ours_name} vs sort_filter (speedup, bar >= 3)"] = med["sort_filter"] / med[ours_name]
            out[f"{ours_name} / amax_floor (bar <= 3)"] = med[ours_name] / med["amax_floor"]
            out[f"{ours_name} / amax_cond (cond alone)"] = med[ours_name] / med["amax_cond"]
    return out


def interleaved_medians_us(parts: dict, repeats: int) -> dict[str, float]:
    """Median µs (wall) of each zero-argument callable, one warm-up call each, then ``repeats`` rounds that
    call every part in turn."""
    times: dict[str, list[float]] = {name: [] for name in parts}
    for fn in parts.values():
        fn()
    for _ in range(repeats):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def stage_breakdown(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    """Median µs (wall) of each stage of the fast torch path on one workload, next to one amax over cond."""
    from tokenloom.kernels import torch_sampling as ts
    from tokenloom.kernels.checks import check_sample_inputs
    from tokenloom.kernels.reference import row_uniforms

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(rows, vocab, generator=g) * 4, torch.randn(rows, vocab, generator=g) * 4
    params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, guidance_scale=SCALE)
    uniforms = row_uniforms(g, rows, "cpu")[:, 0]
    x = ts._guided(cond, uncond, SCALE).clone()
    groups = math.isqrt(vocab // (TOP_K + 1))
    columns_x = x.view(rows, groups, vocab // groups)
    column_max = columns_x.amax(dim=1)
    columns = torch.topk(column_max, TOP_K + 1, dim=-1, sorted=False).indices
    members = columns_x.gather(2, columns[:, None, :].expand(rows, groups, TOP_K + 1)).reshape(rows, -1)
    values, indices, ordered, kth = ts.top_candidates(x, 1.0, TOP_K)
    sorted_values = ts.sort_descending(values)
    weights, _, _ = ts.filter_candidates(values, ordered, kth, sorted_values, TOP_K, TOP_P, 0.0, None)
    stages = {
        "amax_cond": lambda: cond.amax(dim=-1),
        "input checks (finite sums)": lambda: check_sample_inputs(cond, params, uncond, g),
        "guidance (sub + fused add)": lambda: ts._guided(cond, uncond, SCALE),
        "column maxima": lambda: columns_x.amax(dim=1),
        "topk over column maxima": lambda: torch.topk(column_max, TOP_K + 1, dim=-1, sorted=False),
        "gather members": lambda: columns_x.gather(2, columns[:, None, :].expand(rows, groups, TOP_K + 1)),
        "topk over members": lambda: torch.topk(members, TOP_K + 1, dim=-1, sorted=False),
        "top_candidates (all of the above selection)": lambda: ts.top_candidates(x, 1.0, TOP_K),
        "sort candidate values": lambda: ts.sort_descending(values),
        "filter (min-p, top-k, top-p)": lambda: ts.filter_candidates(values, ordered, kth, sorted_values, TOP_K,
                                                                     TOP_P, 0.0, None),
        "draw (two-level inverse CDF)": lambda: ts.draw_candidates(indices, weights, uniforms, vocab),
        "whole torch path": lambda: ours("torch")(cond, uncond, torch.Generator().manual_seed(0), TOP_K),
    }
    return interleaved_medians_us(stages, repeats)


def numba_anatomy(rows: int, vocab: int, repeats: int) -> dict[str, float]:
    """Median µs (wall) of the numba path in three nested parts, next to the floors: its first pass alone
    (guidance, max/min and the scratch row, over both inputs), the whole compiled kernel, and the whole
    ``kernels.sample`` call (input checks, the generator's uniforms, the kernel). Each part is the one
    before plus what it adds: reading both inputs, selecting and drawing, and the Python call."""
    import numba
    import numpy as np

    from tokenloom.kernels import numba_sampling as ns

    @numba.njit
    def first_pass(c, u, scale, z):
        for r in range(c.shape[0]):
            ns._guide(c[r], u[r], True, scale, np.float32(1.0), False, z)

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(rows, vocab, generator=g) * 4, torch.randn(rows, vocab, generator=g) * 4
    c, u, z, scale = cond.numpy(), uncond.numpy(), np.empty(vocab, np.float32), np.float32(SCALE)
    params = SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, guidance_scale=SCALE)
    row_params, uniforms, out = ns._row_params(params, rows), np.full(rows, 0.5), np.empty(rows, np.int64)
    parts = {
        "amax_cond": lambda: amax_cond(cond, uncond, g, TOP_K),
        "amax_floor": lambda: amax_floor(cond, uncond, g, TOP_K),
        "first pass alone (read both, guide, max/min)": lambda: first_pass(c, u, scale, z),
        "compiled kernel alone (+ select, draw)": lambda: ns._sample_rows(c, u, True, scale, row_params, uniforms,
                                                                          out),
        "kernels.sample (+ checks, uniforms, call)": lambda: ours("numba")(cond, uncond, g, TOP_K),
    }
    return interleaved_medians_us(parts, repeats)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, help="write results here")
    parser.add_argument("--plot", help="write a PNG bar chart here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--rounds", type=int, default=5,
                        help="repeats of the main workload's whole measurement; its ratios are reported per round "
                             "and as their median (the memory-bound floor moves 2x between rounds here)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = dict(METHODS)
    if not kernels.numba_available():
        methods.pop("numba")
    compile_seconds = None
    if args.no_compile:
        methods.pop("torch_compiled")
    else:
        g = torch.Generator().manual_seed(0)
        cond, uncond = torch.randn(32, 16_384, generator=g), torch.randn(32, 16_384, generator=g)
        start = time.perf_counter()
        methods["torch_compiled"](cond, uncond, g, TOP_K)
        methods["torch_compiled"](cond, uncond, g, 0)
        compile_seconds = time.perf_counter() - start
        print(f"torch.compile warm-up: {compile_seconds:.1f} s (not timed below)")
    load_before = os.getloadavg()
    results = {}
    for name, (rows, vocab, top_k) in WORKLOADS.items():
        med = measure(rows, vocab, top_k, methods, args.repeats)
        results[name] = {"rows": rows, "vocab": vocab, "top_k": top_k,
                         "median_us": {c: {k: v * 1e6 for k, v in m.items()} for c, m in med.items()},
                         "ratios": {c: ratios(m) for c, m in med.items()}}
        print(f"\n{name}: {rows} rows × V={vocab}, top_k {top_k}      wall µs      cpu µs")
        for k in med["wall"]:
            print(f"  {k:16s} {med['wall'][k] * 1e6:27.1f} {med['cpu'][k] * 1e6:11.1f}")
        for k in results[name]["ratios"]["wall"]:
            print(f"  {k:44s} {results[name]['ratios']['wall'][k]:8.2f} {results[name]['ratios']['cpu'][k]:11.2f}")
    rows, vocab, top_k = WORKLOADS["main"]
    main_rounds = [results["main"]["ratios"]["wall"]]
    for _ in range(args.rounds - 1):
        main_rounds.append(ratios(measure(rows, vocab, top_k, methods, args.repeats)["wall"]))
    main_median = {k: statistics.median(r[k] for r in main_rounds) for k in main_rounds[0]}
    print(f"\nmain workload, wall-time ratios in {args.rounds} rounds (median last):")
    for k in main_median:
        print(f"  {k:44s} " + " ".join(f"{r[k]:7.2f}" for r in main_rounds) + f"   median {main_median[k]:7.2f}")
    stages = stage_breakdown(rows, vocab, args.repeats * 2)
    print("\nwhere the fast torch path spends its time (main workload, wall µs, × one amax over cond):")
    for k, v in stages.items():
        print(f"  {k:46s} {v:9.1f} {v / stages['amax_cond']:7.1f}×")
    anatomy = numba_anatomy(rows, vocab, args.repeats * 4) if "numba" in methods else {}
    if anatomy:
        print("\nthe numba path in nested parts (main workload, wall µs, × amax_floor, × amax_cond):")
        for k, v in anatomy.items():
            print(f"  {k:46s} {v:9.1f} {v / anatomy['amax_floor']:7.2f}× {v / anatomy['amax_cond']:7.2f}×")
    out = {
        "workload": {"guidance_scale": SCALE, "temperature": TEMPERATURE, "top_p": TOP_P},
        "torch_stages_us": stages,
        "numba_anatomy_us": anatomy,
        "main_rounds_wall_ratios": main_rounds, "main_median_wall_ratios": main_median,
        "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "compile_seconds": compile_seconds, "results": results,
    }
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nload average before {load_before}, after {out['load_average_after']}; wrote {args.json}")
    if args.plot:
        plot(results, args.plot)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(results.values()))["median_us"]["wall"])
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), sharey=True)
    width = 0.8 / len(names)
    for ax, clock in zip(axes, ("wall", "cpu")):
        for i, name in enumerate(names):
            ax.bar([j + i * width for j in range(len(results))],
                   [r["median_us"][clock][name] for r in results.values()], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], list(results), fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{clock} time (median)")
    axes[0].set_ylabel("µs per call (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"sampling step: guidance {SCALE}, temperature {TEMPERATURE}, top_k {TOP_K}, top_p {TOP_P}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
