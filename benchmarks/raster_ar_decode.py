"""RasterAR decoding speed: our static KV cache vs a LlamaGen-style cache vs no cache, CPU.

Run: ``python -m benchmarks.raster_ar_decode --json out.json`` (defaults: width 384, depth 6, 6 heads, 16×16 grid,
vocab 4096, batch 4 with classifier-free guidance = 8 rows, all 256 tokens).

Methods (same model, same weights, greedy decoding so every method emits the same tokens — checked):

* ``ours``: ``RasterAR.generate`` — prefill, then one-token steps; attention reads the valid cache prefix
  ``[:, :, :t]`` as a view (no copy, no mask).
* ``llamagen_style``: the same model, but each step's attention reads the *whole* preallocated buffer
  (``max_len`` = round_up(P + L, 8)) through a boolean mask and copies keys/values with
  ``repeat_interleave(n_head // n_kv_head)`` (a copy even when the factor is 1), as LlamaGen's ``Attention``
  does in its KV-cache path.
* ``no_cache``: every step recomputes the full sequence so far (``RasterAR.full_logits``).

Timing: ``torch.set_num_threads(--threads)`` (default 1); each repeat runs every method once, in turn, so load
changes on this shared machine hit all of them alike; medians over ``--repeats``; ratios between medians. The
load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tokenloom.config import SamplingParams
from tokenloom.generators.layers import attention as attention_module
from tokenloom.generators.layers.kv_cache import LayerKV
from tokenloom.generators.raster_ar import RasterAR
from tokenloom.tokens import Grid, TokenSpec


@contextmanager
def llamagen_style_cache():
    """Patch attention so that decode steps read the full buffer with a mask and copy k/v (LlamaGen)."""
    original_update, original_sdpa = LayerKV.update, attention_module.F.scaled_dot_product_attention
    state = {}

    def update(self, k, v):
        start = self.cache.length
        self.k[:, :, start:start + k.shape[2]] = k
        self.v[:, :, start:start + v.shape[2]] = v
        state["end"] = start + k.shape[2]
        return self.k.repeat_interleave(1, dim=1), self.v.repeat_interleave(1, dim=1)

    def sdpa(q, k, v, attn_mask=None, enable_gqa=False, **kw):
        if k.shape[2] != q.shape[2]:  # a cached step: mask the whole buffer
            pos = torch.arange(k.shape[2])
            end = state["end"]
            attn_mask = (pos[None, :] <= (end - q.shape[2] + torch.arange(q.shape[2]))[:, None])
        return original_sdpa(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)

    class _F:
        def __getattr__(self, name):
            return sdpa if name == "scaled_dot_product_attention" else getattr(F, name)

    LayerKV.update = update
    attention_module.F = _F()
    try:
        yield
    finally:
        LayerKV.update = original_update
        attention_module.F = F


@torch.no_grad()
def generate_no_cache(model: RasterAR, labels: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    codes = torch.empty(labels.shape[0], 0, dtype=torch.long)
    for t in range(model.spec.length):
        logits = model.full_logits(labels, codes, guided=True)[:, -1, 0]  # [2B, V]
        b = labels.shape[0]
        nxt = model.output_head.sample_logits(logits[:b, None], params.at_step(t, model.spec.length), None,
                                              logits[b:, None])
        codes = torch.cat([codes, nxt], dim=1)
    return codes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-no-cache", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = TokenSpec(kind="index", vocab_size=args.vocab, layout=Grid(args.grid, args.grid))
    model = RasterAR(token_spec=spec.to_dict(), width=args.width, depth=args.depth, num_heads=args.heads,
                     num_classes=10).eval()
    torch.nn.init.normal_(model.output_head.proj.weight, std=0.02)
    labels = torch.arange(args.batch) % 10
    params = SamplingParams(temperature=0.0, guidance_scale=2.0)

    def ours():
        return model.generate(labels, params).data[..., 0]

    def llamagen():
        with llamagen_style_cache():
            return model.generate(labels, params).data[..., 0]

    methods = {"ours": ours, "llamagen_style": llamagen}
    if not args.skip_no_cache:
        methods["no_cache"] = lambda: generate_no_cache(model, labels, params)
    for fn in methods.values():  # warm-up (allocator, BLAS kernels)
        fn()
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in methods}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    same = {name: bool(torch.equal(out, outputs["ours"])) for name, out in outputs.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "workload": vars(args) | {"rows_with_guidance": 2 * args.batch, "tokens": spec.length},
        "seconds_median": med,
        "ms_per_token_step": {k: 1000 * v / spec.length for k, v in med.items()},
        "speedup_vs_ours": {k: v / med["ours"] for k, v in med.items()},
        "same_tokens_as_ours": same,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
