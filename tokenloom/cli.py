"""The ``tokenloom`` command line.

* ``tokenloom generate "a red circle" -o out.png`` (or ``--class-label 3``, or nothing for an unconditional model)
  samples a pipeline folder; ``--grid`` writes one grid PNG.
* ``tokenloom reconstruct IMG -o OUT`` tokenizes and decodes an image; ``tokenloom inpaint IMG --mask MASK -o OUT``
  regenerates the white part of the mask (any folder whose generator can edit: random-order, masked, next-scale).
* ``tokenloom convert llamagen|var|mar ... --out DIR`` turns published checkpoints into a pipeline folder.
* ``tokenloom train NAME ...``, ``tokenloom evaluate NAME ...`` and ``tokenloom bench NAME ...`` are front doors:
  they run ``scripts/train_NAME.py``, ``scripts/evaluate_NAME.py`` and ``python -m benchmarks.NAME`` with the rest
  of the command line passed verbatim (``tokenloom train generator --help`` shows the script's own options).

User errors (bad paths, images, arguments) print one line ``tokenloom CMD: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import os
import pickle
import subprocess
import sys
from pathlib import Path

# name → (checkpoint options, config options) of ``tokenloom convert NAME``
CONVERTERS = {
    "llamagen": (("vq", "gpt"), ("vq_config", "gpt_config")),
    "var": (("vae", "var"), ("vae_config", "var_config")),
    "mar": (("vae", "mar"), ("vae_config", "mar_config")),
}


def _save_images(images, out: Path, grid: bool) -> list[Path]:
    """``images: [B, 3, H, W]`` in [0, 1] → one PNG (a grid when ``grid`` or a single image), else ``OUT_000.png``..."""
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


class UserError(ValueError):
    """A problem with the command line's inputs, reported in one line."""


def _load_folder(model: str):
    import tokenloom

    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise UserError(f"--model: {model} is not a pipeline folder (no model_index.json)")
    return tokenloom.load(path)


def _load_as(model, cls):
    """The folder ``model`` as a ``cls`` pipeline, sharing its components when it holds another task."""
    import tokenloom

    if model is None:
        return tokenloom.pipeline(cls.task)
    pipe = _load_folder(model)
    return pipe if type(pipe) is cls else cls.from_pipe(pipe)


def _generation_class(pipe):
    from tokenloom.pipelines.conditions import KIND_TASK
    from tokenloom.pipelines.registry import pipeline_class

    return pipeline_class(KIND_TASK[pipe.token_generator.condition_kind])


def _sampling_kwargs(args) -> dict:
    return dict(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, num_steps=args.steps)


def _seeded(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def _progress(pipe, args):
    if args.no_progress:
        pipe.set_progress_bar_config(disable=True)
    return pipe


def cmd_generate(args) -> int:

    import tokenloom

    if args.model is None:
        task = "class-to-image" if args.class_label is not None else "text-to-image"
        pipe = tokenloom.pipeline(task, model=None)
    else:
        pipe = _load_folder(args.model)
        cls = _generation_class(pipe)
        pipe = pipe if type(pipe) is cls else cls.from_pipe(pipe)
    _progress(pipe, args)
    common = dict(generator=_seeded(args.seed), output_type="pt", **_sampling_kwargs(args))
    if pipe.task == "text-to-image":
        if not args.prompt or args.class_label is not None:
            raise UserError("this model is text-conditioned: give one or more prompts (and no --class-label)")
        out = pipe(args.prompt, num_images_per_prompt=args.num_images, **common)
    elif pipe.task == "class-to-image":
        if args.class_label is None or args.prompt:
            raise UserError("this model is class-conditional: give --class-label N [N ...] (and no prompt)")
        out = pipe(args.class_label, num_images_per_prompt=args.num_images, **common)
    else:
        if args.class_label is not None or args.prompt:
            raise UserError("this model is unconditional: give no prompt and no --class-label (-n sets the count)")
        common.pop("guidance_scale")
        out = pipe(batch_size=args.num_images, **common)
    for p in _save_images(out.images, Path(args.output), args.grid):
        print(p)
    return 0


def _open_image(path: str, option: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UserError(f"{option}: no such file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{option}: cannot read {path} as an image ({err})") from err


def _fit(image, size: tuple[int, int], option: str):
    """Resize a PIL image to the model's ``(H, W)`` (bicubic), saying so on stderr."""
    from PIL import Image

    h, w = size
    if image.size == (w, h):
        return image
    print(f"tokenloom: note: {option} resized from {image.size[1]}x{image.size[0]} to the model's {h}x{w}",
          file=sys.stderr)
    return image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)


def cmd_reconstruct(args) -> int:
    from tokenloom.pipelines.images import image_size
    from tokenloom.pipelines.reconstruction import ImageReconstructionPipeline

    pipe = _progress(_load_as(args.model, ImageReconstructionPipeline), args)
    image = _open_image(args.image, "IMG")
    if isinstance(getattr(pipe.image_tokenizer, "image_size", None), int):
        image = _fit(image, image_size(pipe.image_tokenizer, pipe.image_tokenizer.spec), "IMG")
    out = pipe(image, output_type="pt")
    for p in _save_images(out.images, Path(args.output), False):
        print(p)
    return 0


def cmd_inpaint(args) -> int:
    from PIL import Image

    from tokenloom.pipelines.images import image_size
    from tokenloom.pipelines.inpainting import InpaintingPipeline

    image = _open_image(args.image, "IMG")
    mask = _open_image(args.mask, "--mask")
    if mask.size != image.size:
        raise UserError(f"--mask must have the size of IMG ({image.size[1]}x{image.size[0]} pixels, H x W), got "
                        f"{mask.size[1]}x{mask.size[0]}")
    pipe = _progress(_load_as(args.model, InpaintingPipeline), args)
    size = image_size(pipe.image_tokenizer, pipe.token_generator.spec)
    image = _fit(image, size, "IMG")
    mask = mask.convert("L").resize((size[1], size[0]), Image.Resampling.NEAREST) if mask.size != image.size \
        else mask
    cond = {}
    if args.prompt is not None:
        cond["prompt"] = args.prompt
    if args.negative_prompt is not None:
        cond["negative_prompt"] = args.negative_prompt
    if args.class_label is not None:
        cond["class_labels"] = args.class_label
    out = pipe(image, mask, num_images_per_prompt=args.num_images, generator=_seeded(args.seed),
               output_type="pt", **cond, **_sampling_kwargs(args))
    for p in _save_images(out.images, Path(args.output), args.grid):
        print(p)
    return 0


# ---------------------------------------------------------------- front doors to scripts/ and benchmarks/
REPO = Path(__file__).resolve().parent.parent
FORWARDS = {  # command → (folder, env override, file prefix, what it runs)
    "train": ("scripts", "TOKENLOOM_SCRIPTS_DIR", "train_", "scripts/train_NAME.py"),
    "evaluate": ("scripts", "TOKENLOOM_SCRIPTS_DIR", "evaluate_", "scripts/evaluate_NAME.py"),
    "bench": ("benchmarks", "TOKENLOOM_BENCHMARKS_DIR", "", "python -m benchmarks.NAME"),
}


def _forward_dir(command: str) -> Path:
    folder, env, _, _ = FORWARDS[command]
    return Path(os.environ.get(env) or REPO / folder)


def forward_names(command: str) -> list[str]:
    """The NAMEs ``tokenloom COMMAND NAME`` can run (from the script or benchmark files present)."""
    _, _, prefix, _ = FORWARDS[command]
    folder = _forward_dir(command)
    if not folder.is_dir():
        return []
    return sorted(p.stem[len(prefix):] for p in folder.glob(f"{prefix}*.py")
                  if p.stem != "__init__" and not p.stem.startswith("_"))


def _forward_help(command: str) -> str:
    names = forward_names(command)
    what = FORWARDS[command][3]
    listing = ", ".join(names) if names else f"none found in {_forward_dir(command)}"
    return (f"usage: tokenloom {command} NAME [ARGS ...]\n\nRuns {what} with ARGS passed verbatim "
            f"(`tokenloom {command} NAME --help` shows its options).\nNAME: {listing}\n")


def forward(command: str, argv: list[str]) -> int:
    """``tokenloom COMMAND NAME ARGS...`` → run the script or benchmark NAME with ARGS verbatim; its exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_forward_help(command), file=sys.stdout if argv else sys.stderr, end="")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    names = forward_names(command)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        listing = ", ".join(names) if names else f"none found in {_forward_dir(command)}"
        print(f"tokenloom {command}: error: unknown NAME {name!r}{hint}; available: {listing}", file=sys.stderr)
        return 2
    folder = _forward_dir(command)
    env = dict(os.environ)
    if command == "bench":  # ``python -m benchmarks.NAME`` from the caller's directory: put the repo on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder.parent), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", f"{folder.name}.{name}", *rest]
    else:
        cmd = [sys.executable, str(folder / f"{FORWARDS[command][2]}{name}.py"), *rest]
    return subprocess.run(cmd, env=env).returncode


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


def _add_sampling(p) -> None:
    p.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt or class (default 1)")
    p.add_argument("--grid", action="store_true", help="write one grid PNG instead of one file per image")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same images)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1: off; default: "
                   "the folder's)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="0: off")
    p.add_argument("--top-p", type=float, default=None, help="1: off")
    p.add_argument("--steps", type=int, default=None, help="decoding steps (random-order / masked generators)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenloom", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="prompt, class or nothing → PNG (or a grid)",
                         description="Sample a pipeline folder: prompts for a text-conditioned model, --class-label "
                                     "for a class-conditional one, neither for an unconditional one.")
    gen.add_argument("prompt", nargs="*", help="one or more prompts (text-to-image)")
    gen.add_argument("--class-label", type=int, nargs="+", default=None, help="class indices (class-to-image)")
    gen.add_argument("-m", "--model", default=None, help="pipeline folder (default: the packaged model)")
    gen.add_argument("-o", "--output", default="out.png", help="output PNG path (several images: OUT_000.png ...)")
    _add_sampling(gen)
    gen.set_defaults(func=cmd_generate)

    rec = sub.add_parser("reconstruct", help="image → tokens → image (the tokenizer alone)",
                         description="Tokenize an image with a pipeline folder's image tokenizer and decode it back. "
                                     "The image is resized to the tokenizer's size when it has one.")
    rec.add_argument("image", metavar="IMG", help="input image file")
    rec.add_argument("-m", "--model", required=True, help="pipeline folder (any task: its image_tokenizer is used)")
    rec.add_argument("-o", "--output", required=True, help="output PNG path")
    rec.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    rec.set_defaults(func=cmd_reconstruct)

    inp = sub.add_parser("inpaint", help="regenerate the white part of a mask",
                         description="Keep the image's tokens outside the mask (white = regenerate, black = keep; a "
                                     "token is kept when its whole patch is black) and generate the rest. Works with "
                                     "folders whose generator can edit (random-order, masked, next-scale). Image and "
                                     "mask are resized to the model's size when needed.")
    inp.add_argument("image", metavar="IMG", help="input image file")
    inp.add_argument("--mask", required=True, help="mask image file, the size of IMG (white = regenerate)")
    inp.add_argument("--prompt", default=None, help="prompt (text-conditioned models)")
    inp.add_argument("--negative-prompt", default=None, help="negative prompt (text-conditioned models)")
    inp.add_argument("--class-label", type=int, default=None, help="class index (class-conditional models)")
    inp.add_argument("-m", "--model", required=True, help="pipeline folder whose generator can edit")
    inp.add_argument("-o", "--output", required=True, help="output PNG path (several images: OUT_000.png ...)")
    _add_sampling(inp)
    inp.set_defaults(func=cmd_inpaint)

    _add_convert(sub)
    for command, (_, env, _, what) in FORWARDS.items():
        fwd = sub.add_parser(command, help=f"front door: runs {what} with the rest of the line verbatim",
                             description=f"Runs {what} with ARGS passed verbatim; `tokenloom {command} NAME --help` "
                                         f"shows its options. NAMEs come from the files present ({env} overrides "
                                         f"the folder).", add_help=False)
        fwd.add_argument("name", metavar="NAME", nargs="?")
        fwd.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER)
    return parser


USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDS:  # forwarded verbatim, before argparse can interpret the script's options
        return forward(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        where = f"{args.command} {args.converter}" if args.command == "convert" else args.command
        print(f"tokenloom {where}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
