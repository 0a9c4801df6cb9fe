"""The ``tokenloom`` command line.

``tokenloom generate "a red circle" -o out.png`` samples a pipeline folder;
``tokenloom convert llamagen|var|mar ... --out DIR`` turns published checkpoints into one.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

# name → (checkpoint options, config options) of ``tokenloom convert NAME``
CONVERTERS = {
    "llamagen": (("vq", "gpt"), ("vq_config", "gpt_config")),
    "var": (("vae", "var"), ("vae_config", "var_config")),
    "mar": (("vae", "mar"), ("vae_config", "mar_config")),
}


def _save_images(images, out: Path, grid: bool) -> list[Path]:
    from torchvision.utils import make_grid, save_image

    out.parent.mkdir(parents=True, exist_ok=True)
    if grid or len(images) == 1:
        nrow = max(1, int(len(images) ** 0.5 + 0.999))
        save_image(make_grid(images, nrow=nrow, padding=2), out)
        return [out]
    paths = []
    for i, img in enumerate(images):
        p = out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
        save_image(img, p)
        paths.append(p)
    return paths


def cmd_generate(args) -> int:
    import torch

    import tokenloom

    task = "class-to-image" if args.class_label is not None else "text-to-image"
    pipe = tokenloom.pipeline(task, model=args.model)
    kwargs = dict(num_images_per_prompt=args.num_images, generator=torch.Generator().manual_seed(args.seed),
                  output_type="pt", guidance_scale=args.guidance_scale, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p)
    if task == "text-to-image":
        if not args.prompt:
            raise SystemExit("tokenloom generate: give a prompt, or --class-label N for a class-conditional model")
        out = pipe(args.prompt, **kwargs)
    else:
        out = pipe(args.class_label, **kwargs)
    for p in _save_images(out.images, Path(args.output), args.grid):
        print(p)
    return 0


class ConvertError(ValueError):
    """A user-facing conversion problem (missing file, unreadable container)."""


def _json(path: str | None) -> dict | None:
    import json

    return None if path is None else json.loads(Path(path).read_text())


def _convert_llamagen(args):
    from tokenloom.interop.llamagen import LLAMAGEN_GPT_PRESETS, llamagen_pipeline

    gpt_args = args.gpt_config if args.gpt_config is not None else args.preset
    if args.gpt_config is not None and args.preset is not None:
        if args.preset not in LLAMAGEN_GPT_PRESETS:
            raise ValueError(f"--preset must be one of {sorted(LLAMAGEN_GPT_PRESETS)}, got {args.preset!r}")
        gpt_args = {**LLAMAGEN_GPT_PRESETS[args.preset], **_gpt_model_args(args.gpt_config)}
    return llamagen_pipeline(args.vq, args.gpt, vq_args=args.vq_config or args.vq_preset, gpt_args=gpt_args,
                             image_size=args.image_size, cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval,
                             top_k=args.top_k, top_p=args.top_p, temperature=args.temperature)


def _gpt_model_args(path: str) -> dict:
    config = _json(path)
    return dict(config.get("ModelArgs", config))


def _convert_var(args):
    from tokenloom.interop.var import write_var_pipeline

    vae = _json(args.vae_config) or {}
    vqvae = vae.get("VQVAE", vae) or None
    ddconfig = vae.get("ddconfig_overrides")
    return write_var_pipeline(args.var, args.vae, args.out, var_config=args.var_config or args.preset,
                              vqvae=vqvae, ddconfig=ddconfig, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)


def _convert_mar(args):
    from tokenloom.interop.mar import mar_pipeline

    return mar_pipeline(args.mar, args.vae, args.mar_config or args.preset, args.vae_config, cfg=args.cfg,
                        num_iter=args.num_iter, temperature=args.temperature, cfg_schedule=args.cfg_schedule)


def _check_torch_file(path: str, option: str) -> None:
    """``torch.save`` writes a zip archive (or, legacy, a pickle starting with its protocol byte 0x80)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(1)
    if not (zipfile.is_zipfile(path) or head == b"\x80"):
        raise ConvertError(f"--{option}: {path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a "
                           f"legacy pickle)")


def _inputs(args, names) -> str:
    return ", ".join(f"--{n.replace('_', '-')} {getattr(args, n)}" for n in names if getattr(args, n) is not None)


def cmd_convert(args) -> int:
    """Check the inputs exist, convert, save the pipeline folder and print its path."""
    checkpoints, configs = CONVERTERS[args.converter]
    for name in checkpoints + configs:
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise ConvertError(f"--{name.replace('_', '-')}: no such file: {path}")
    for name in checkpoints:
        _check_torch_file(getattr(args, name), name)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ConvertError(f"--out {out} exists and is not an empty folder (pass --overwrite to replace its files)")
    try:
        pipe = {"llamagen": _convert_llamagen, "var": _convert_var, "mar": _convert_mar}[args.converter](args)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:  # torch.load on a file that is no checkpoint
        raise ConvertError(f"cannot read {_inputs(args, checkpoints)} as {args.converter} checkpoints: "
                           f"{type(err).__name__}: {err}") from err
    except (ValueError, TypeError) as err:
        raise ConvertError(f"{err}\n  (inputs: {_inputs(args, checkpoints + configs)})") from err
    if args.converter != "var":  # write_var_pipeline saves itself
        pipe.save_pretrained(str(out))
    print(out)
    return 0


def _add_convert(sub) -> None:
    conv = sub.add_parser("convert", help="published checkpoints (LlamaGen, VAR, MAR) → a pipeline folder",
                          description="Convert published checkpoints into a class-to-image pipeline folder that "
                                      "tokenloom.pipeline('class-to-image', model=DIR) samples from.")
    kinds = conv.add_subparsers(dest="converter", required=True, metavar="{" + ",".join(CONVERTERS) + "}")

    def common(p):
        p.add_argument("--out", required=True, help="pipeline folder to write")
        p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
        p.set_defaults(func=cmd_convert)

    # Preset names and defaults are checked by the converters, so building the parser imports no model code.
    lg = kinds.add_parser("llamagen", help="LlamaGen VQ tokenizer + class-conditional GPT",
                          description="LlamaGen (vq_ds16_c2i.pt + c2i_*.pt) → class-to-image pipeline. Sizes come from "
                                      "the checkpoints; n_head and block_size from --gpt-config, --preset or "
                                      "--image-size. Sampling defaults are sample_c2i.py's, translated.")
    lg.add_argument("--vq", required=True, help="LlamaGen VQ checkpoint (e.g. vq_ds16_c2i.pt)")
    lg.add_argument("--gpt", required=True, help="LlamaGen c2i GPT checkpoint (e.g. c2i_B_256.pt)")
    lg.add_argument("--preset", default=None, help="published GPT size: GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B "
                    "(default: the one matching the checkpoint's dim and depth)")
    lg.add_argument("--vq-preset", default=None, help="published VQ size: VQ-16, VQ-8 (cross-checked)")
    lg.add_argument("--vq-config", default=None, help="JSON with the VQ ModelArgs (a 'ModelArgs' section is read)")
    lg.add_argument("--gpt-config", default=None, help="JSON with the GPT ModelArgs (a 'ModelArgs' section is read)")
    lg.add_argument("--image-size", type=int, default=None, help="LlamaGen's --image-size (256 or 384; default 256)")
    lg.add_argument("--cfg-scale", type=float, default=4.0, help="LlamaGen cfg_scale (<= 1: off; default 4.0)")
    lg.add_argument("--cfg-interval", type=int, default=-1, help="LlamaGen cfg_interval (-1: always)")
    lg.add_argument("--top-k", type=int, default=2000, help="0: off (default 2000)")
    lg.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    lg.add_argument("--temperature", type=float, default=1.0)
    common(lg)

    va = kinds.add_parser("var", help="VAR multi-scale VQVAE + VAR transformer",
                          description="VAR (vae_ch160v4096z32.pth + var_d*.pth) → class-to-image pipeline. Sizes come "
                                      "from the checkpoints; the VQVAE's from --vae-config (default: the released "
                                      "VQVAE). Sampling defaults are VAR's evaluation settings, translated.")
    va.add_argument("--vae", required=True, help="VAR VQVAE checkpoint (raw state_dict .pth)")
    va.add_argument("--var", required=True, help="VAR transformer checkpoint (raw state_dict .pth)")
    va.add_argument("--preset", default=None, help="published VAR size d16, d20, d24, d30 (cross-checked; "
                    "used when no --var-config)")
    va.add_argument("--vae-config", default=None, help="JSON with VQVAE arguments ('VQVAE', 'ddconfig_overrides')")
    va.add_argument("--var-config", default=None, help="JSON with VAR arguments (a 'VAR' section is read)")
    va.add_argument("--cfg", type=float, default=1.5, help="VAR cfg (ramped linearly over the scales)")
    va.add_argument("--top-k", type=int, default=900, help="0: off")
    va.add_argument("--top-p", type=float, default=0.96, help="0: off (VAR's convention)")
    common(va)

    ma = kinds.add_parser("mar", help="MAR KL VAE + MAR transformer with diffusion head",
                          description="MAR (kl16.ckpt + checkpoint-last.pth, model_ema) → class-to-image pipeline. "
                                      "Sizes come from the checkpoints; heads and patch size from --mar-config, "
                                      "--preset, the checkpoint's saved args or the matching published size.")
    ma.add_argument("--vae", required=True, help="MAR KL VAE checkpoint ({'model': state_dict})")
    ma.add_argument("--mar", required=True, help="MAR checkpoint (checkpoint-last.pth)")
    ma.add_argument("--preset", default=None, help="published MAR size mar_base, mar_large, mar_huge (used when "
                    "no --mar-config)")
    ma.add_argument("--vae-config", default=None, help="JSON with AutoencoderKL arguments")
    ma.add_argument("--mar-config", default=None, help="JSON with MAR arguments (a 'MAR' section is read)")
    ma.add_argument("--cfg", type=float, default=1.0, help="MAR cfg (1: off)")
    ma.add_argument("--cfg-schedule", choices=("linear", "constant"), default="linear")
    ma.add_argument("--num-iter", type=int, default=None, help="masked-AR iterations (default min(64, L))")
    ma.add_argument("--temperature", type=float, default=1.0, help="diffusion head noise temperature")
    common(ma)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenloom", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="prompt or class → PNG (or a grid)")
    gen.add_argument("prompt", nargs="*", help="one or more prompts (text-to-image)")
    gen.add_argument("--class-label", type=int, nargs="+", default=None, help="class indices (class-to-image)")
    gen.add_argument("-m", "--model", default=None, help="pipeline folder (default: the packaged model)")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG path")
    gen.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt or class")
    gen.add_argument("--grid", action="store_true", help="write one grid PNG instead of one file per image")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance-scale", type=float, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.set_defaults(func=cmd_generate)
    _add_convert(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        where = f"{args.command} {args.converter}" if args.command == "convert" else args.command
        print(f"tokenloom {where}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
