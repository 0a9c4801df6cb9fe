"""The packaged default text-to-image model: time to first image (fresh process, CPU) and images per second.

Run: ``python -m benchmarks.default_model [--json out.json] [--threads 1] [--batch 64] [--repeats 3]``.

* time to first image: a fresh ``python -c`` process (``HF_HUB_OFFLINE=1``) that imports tokenloom, loads the
  packaged default with ``tokenloom.pipeline("text-to-image")`` and generates one image for one prompt; measured
  from before the process starts (so interpreter start-up and every import count) to its exit, plus the split
  the child reports (imports, load, first image).
* images/s: in this process, ``--batch`` images (6 prompts, the folder's default sampling settings, classifier-free
  guidance included), after one warm-up call; median of ``--repeats``. Measured with the folder's reranking (best
  of ``num_candidates`` candidates per image, scored by its ``scorer``) and without it (``num_candidates=1``).

Wall and process CPU time are both recorded, with the load average: on a shared machine, wall time includes
waiting for a core; CPU time does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import time, json
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
import tokenloom
t1 = time.perf_counter()
pipe = tokenloom.pipeline("text-to-image")
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
image = pipe("a green triangle", generator=torch.Generator().manual_seed(0)).images[0]
t3 = time.perf_counter()
print(json.dumps({{"imports_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t2, "size": list(image.size)}}))
"""

PROMPTS = ["a red circle", "a green triangle", "two blue squares", "a yellow square and a magenta circle",
           "a white circle above a cyan triangle", "three triangles"]


def time_to_first_image(threads: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    cpu0 = os.times()
    out = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads)], capture_output=True, text=True,
                         env=env, check=True)
    wall = time.perf_counter() - start
    cpu1 = os.times()
    child = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "cpu_s": (cpu1.children_user - cpu0.children_user)
            + (cpu1.children_system - cpu0.children_system), **child}


def images_per_second(pipe, batch: int, repeats: int, num_candidates: int | None = None) -> dict:
    import torch

    per = max(1, batch // len(PROMPTS))
    n = per * len(PROMPTS)

    def once():
        pipe(PROMPTS, num_images_per_prompt=per, generator=torch.Generator().manual_seed(0), output_type="pt",
             num_candidates=num_candidates)

    once()
    walls, cpus = [], []
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        once()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    return {"images": n, "wall_s": wall, "cpu_s": cpu, "images_per_s_wall": n / wall, "images_per_s_cpu": n / cpu,
            "num_candidates": num_candidates or pipe.config.num_candidates,
            "sampling_defaults": pipe.config.sampling_defaults}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64, help="images per call for images/s")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    first = time_to_first_image(args.threads)
    import torch

    import tokenloom

    torch.set_num_threads(args.threads)
    pipe = tokenloom.pipeline("text-to-image")
    pipe.set_progress_bar_config(disable=True)
    rate = images_per_second(pipe, args.batch, args.repeats)
    plain = images_per_second(pipe, args.batch, args.repeats, num_candidates=1)
    result = {"time_to_first_image": first, "throughput": rate, "throughput_without_reranking": plain,
              "threads": args.threads, "load_average_before": load_before, "load_average_after": os.getloadavg()}
    print(f"time to first image (fresh process, CPU, {args.threads} thread): {first['wall_s']:.2f} s wall "
          f"({first['cpu_s']:.2f} s CPU; imports {first['imports_s']:.2f} s, load {first['load_s']:.2f} s, "
          f"first image {first['first_image_s']:.2f} s)")
    for name, r in (("default", rate), ("without reranking", plain)):
        print(f"images/s, {name} (best of {r['num_candidates']}; batch {r['images']}, guided): "
              f"{r['images_per_s_wall']:.1f} wall, {r['images_per_s_cpu']:.1f} per CPU-second")
    print(f"load average before {load_before[0]:.1f}, after {result['load_average_after'][0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
