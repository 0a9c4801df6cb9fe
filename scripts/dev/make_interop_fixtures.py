"""Make checkpoint-parity fixtures of other sizes (LlamaGen, VAR, MAR) with the reference classes.

Follows ../shared/fixtures/README.md section 0: construct with the reference classes (tiny-model overrides of the
autoencoders' Encoder/Decoder), overwrite every parameter with random values (Linear/Conv weights ~ N(0, 1/fan_in),
biases ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.2^2), embeddings ~ N(0, 1), other bare parameters ~ N(0, 0.5^2)),
eval mode, no-grad, CPU, float32. Writes the same layout as the public fixtures: checkpoint (same container),
config.json, io.safetensors, io.json.

A developer tool, not used by the tests (they read the generated files). It imports the reference code, which is
not part of tokenloom: copy the needed files out of the reference repositories at the pinned commits into a folder
outside the repository and pass it as ``--ref`` (it is put on ``sys.path`` inside each ``make_*`` function; nothing
is imported at module import time):

* ``<ref>/llamagen/``: ``autoregressive/models/gpt.py``, ``tokenizer/tokenizer_image/vq_model.py``,
  ``utils/drop_path.py`` (FoundationVision/LlamaGen ce98ec41803a74a90ce68c40ababa9eaeffeb4ec);
* ``<ref>/var/``: ``dist.py``, ``models/{__init__,basic_vae,basic_var,helpers,quant,var,vqvae}.py``
  (FoundationVision/VAR 78b95394fc5896192e3a003e4b295f8ea743c48f);
* ``<ref>/mar/``: ``models/{diffloss,mar,vae}.py``, ``diffusion/{__init__,diffusion_utils,gaussian_diffusion,
  respace}.py`` (LTH14/mar fe470ac24afbee924668d8c5c83e9fec60af3a73); MAR needs timm, scipy and tqdm.

e.g. ``git --git-dir=<mirror> show <commit>:models/var.py > <ref>/var/models/var.py``.

Usage (one project per process: the reference repositories share module names such as ``models``)::

    python scripts/dev/make_interop_fixtures.py --ref /tmp/ref --out /tmp/alt --variant v1 --project llamagen
    python scripts/dev/make_interop_fixtures.py --ref /tmp/ref --out /tmp/alt --variant v1 --project var
    python scripts/dev/make_interop_fixtures.py --ref /tmp/ref --out /tmp/alt --variant v1 --project mar
    TOKENLOOM_FIXTURES=/tmp/alt/v1 python -m pytest tests/test_interop_*.py tests/test_llamagen_vq.py

Variants: ``v1``, ``v2`` change every size the fixtures README lists (codebook size and dim, grid, autoencoder
levels, residual blocks, attention resolutions, scales, depth, width, heads, classes, MAR patch size, buffer,
DiffLoss depth/width, sampling steps); ``v3``/``v4`` (VAR only) use the non-shared and fully shared φ layouts and a
VQVAE without attention; ``small`` is the set kept in ``tests/fixtures/alt_sizes`` (transformers only).
"""

from __future__ import annotations

import argparse
import os

import torch
from interop_fixtures_common import VARIANTS
from interop_fixtures_llamagen import make_llamagen
from interop_fixtures_mar import make_mar
from interop_fixtures_var import make_var


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", required=True, help="folder with the reference sources (see the module docstring)")
    ap.add_argument("--out", required=True, help="fixture root to write (<out>/<variant>/<project>/...)")
    ap.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--project", choices=["llamagen", "var", "mar"], required=True)
    ap.add_argument("--seed", type=int, default=7000)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.backends.cuda.matmul.allow_tf32 = False
    out = os.path.join(args.out, args.variant)
    {"llamagen": make_llamagen, "var": make_var, "mar": make_mar}[args.project](
        os.path.abspath(args.ref), out, args.variant, args.seed + 100 * sorted(VARIANTS).index(args.variant))


if __name__ == "__main__":
    main()
