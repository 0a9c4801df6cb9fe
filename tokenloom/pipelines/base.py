"""What every tokenloom pipeline shares: components, sampling settings, seeding and output formats.

A pipeline folder is a normal diffusers folder: ``model_index.json`` plus one subfolder per
component (``image_tokenizer``, ``token_generator``, optional ``conditioner``), safetensors weights.
Default sampling settings are stored in ``model_index.json`` (``sampling_defaults``) so a converted
checkpoint samples with its reference settings unless the caller overrides them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from PIL import Image
from torch import Tensor

from tokenloom.config import GuidanceSchedule, SamplingParams
from tokenloom.tokens import Tokens

OUTPUT_TYPES = ("pil", "np", "pt", "tokens")
SHIM = "tokenloom_pipeline"
SHIM_DOC = '"""tokenloom pipeline shim: lets diffusers\' generic loader find the class (needs tokenloom)."""'
COMPONENTS = ("image_tokenizer", "token_generator", "conditioner", "scorer")  # what from_pipe hands on, when taken
SETTINGS = ("sampling_defaults", "card", "num_candidates")
_SCALAR_FIELDS = ("temperature", "top_k", "top_p", "min_p", "guidance_scale", "num_steps")


@dataclass
class TokenPipelineOutput(BaseOutput):
    """``images``: list of PIL images, ``[B, H, W, 3]`` numpy or ``[B, 3, H, W]`` tensor in [0, 1], or None
    for ``output_type="tokens"``; ``tokens``: the generated :class:`Tokens`."""

    images: list | np.ndarray | Tensor | None
    tokens: Tokens | None = None
    known_mask: Tensor | None = None  # editing tasks: [B, L] bool, True where a token was kept from the input


def params_to_dict(params: SamplingParams) -> dict:
    """JSON form of scalar SamplingParams (for ``model_index.json``)."""
    d = {name: getattr(params, name) for name in _SCALAR_FIELDS}
    d["guidance_schedule"] = {f.name: getattr(params.guidance_schedule, f.name)
                              for f in fields(GuidanceSchedule)}
    d["guidance_schedule"]["values"] = list(d["guidance_schedule"]["values"])
    return d


def params_from_dict(d: dict | None) -> SamplingParams:
    if not d:
        return SamplingParams()
    d = dict(d)
    schedule = d.pop("guidance_schedule", None)
    if schedule is not None:
        d["guidance_schedule"] = GuidanceSchedule(**schedule)
    return SamplingParams(**d)


def row_generators(generator, rows: int, device) -> list[torch.Generator]:
    """One ``torch.Generator`` per output row, so a row's image depends only on its own seed.

    Row ``i``'s generator is seeded with a 63-bit draw: from ``generator[i]`` when a list is given, or the
    ``i``-th draw of a single generator. So ``generator=g`` alone, ``generator=[g, ...]`` in a batch and
    ``generator=g`` for a batch all give the same first image for equally seeded ``g``.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != rows:
            raise ValueError(f"generator must be one torch.Generator or a list of {rows} (one per image), "
                             f"got a list of {len(generator)}")
        seeds = [int(torch.randint(0, 2**63 - 1, (1,), generator=g)) for g in generator]
    else:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, a list of them or None, "
                            f"got {type(generator).__name__}")
        seeds = torch.randint(0, 2**63 - 1, (rows,), generator=generator).tolist()
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


class TokenPipeline(DiffusionPipeline):
    """Base of tokenloom pipelines; subclasses define ``__call__`` for their task.

    Device and precision: ``.to(device, dtype)`` moves and casts every component (diffusers');
    :meth:`enable_autocast` runs the components under ``torch.autocast`` (bf16/fp16 where the device supports it);
    ``enable_model_cpu_offload(device=...)`` works as in diffusers: each component is moved to the execution
    device when the pipeline calls it (our components are called through ``encode``/``generate``/``decode``, not
    ``forward``, so the pipeline triggers accelerate's hook itself; see :meth:`component`).
    """

    task: str = ""
    model_cpu_offload_seq = "conditioner->token_generator->image_tokenizer"
    _optional_components = ["conditioner"]
    autocast_dtype: torch.dtype | None = None

    def register_modules(self, **kwargs):
        """As diffusers, but tokenloom components are recorded as ``["tokenloom.components", ClassName]``."""
        from tokenloom.components import LIBRARY

        super().register_modules(**kwargs)
        for name, module in kwargs.items():
            if module is not None and type(module).__module__.startswith("tokenloom."):
                self.register_to_config(**{name: (LIBRARY, type(module).__name__)})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As diffusers; imports the component modules the folder names and trusts tokenloom's own shim."""
        from tokenloom.pipelines.registry import import_components

        folder = Path(pretrained_model_name_or_path)
        if (folder / "model_index.json").exists():
            import_components(folder)
            shim = folder / f"{SHIM}.py"
            if shim.exists() and shim.read_text().startswith(SHIM_DOC):
                kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """A ``cls`` pipeline sharing ``pipeline``'s components (no copy) and settings, e.g. an inpainting pipeline
        from a class-to-image folder: ``InpaintingPipeline.from_pipe(tokenloom.load(folder))``.

        As diffusers' ``from_pipe``, whose exact-class match of components against ``__init__`` type hints cannot
        accept tokenloom's interchangeable tokenizers and generators. ``kwargs`` replace components or settings
        (``sampling_defaults``, ``card``, ``num_candidates``) that ``cls`` takes.
        """
        if not isinstance(pipeline, TokenPipeline):
            raise TypeError(f"pipeline must be a tokenloom pipeline, got {type(pipeline).__name__}")
        allowed = [name for name in COMPONENTS + SETTINGS if name in inspect.signature(cls.__init__).parameters]
        unknown = sorted(set(kwargs) - set(allowed))
        if unknown:
            raise TypeError(f"from_pipe got unknown arguments {unknown}; allowed: {sorted(allowed)}")
        parts = {name: getattr(pipeline, name, None) for name in allowed if name in COMPONENTS}
        parts.update({name: pipeline.config[name] for name in allowed
                      if name in SETTINGS and pipeline.config.get(name) is not None})
        parts.update(kwargs)
        new = cls(**parts)
        new.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
        return new

    def save_pretrained(self, save_directory, card: dict | None = None, **kwargs):
        """As diffusers, plus a one-line ``tokenloom_pipeline.py`` shim so that the generic
        ``DiffusionPipeline.from_pretrained(folder)`` finds this class (``_class_name`` names the shim), and a model
        card ``README.md``.

        Args:
            card: model-card fields (``recipe``, ``data``, ``metrics``, ``licence``, ``description``; see
                :mod:`tokenloom.pipelines.model_card`), merged over the pipeline's own ``card`` config and kept in
                ``model_index.json``; fields missing from both are written as ``unknown``.
        """
        from tokenloom.pipelines.model_card import check_card, render_card

        merged = {**check_card(self.config.get("card")), **check_card(card)}
        self.register_to_config(card=merged or None)
        super().save_pretrained(save_directory, **kwargs)
        folder = Path(save_directory)
        (folder / "README.md").write_text(render_card(self, merged, folder.name))
        cls = type(self)
        (folder / f"{SHIM}.py").write_text(f"{SHIM_DOC}\nfrom {cls.__module__} import {cls.__name__}  # noqa: F401\n")
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [SHIM, cls.__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _register(self, image_tokenizer, token_generator, conditioner=None, sampling_defaults=None, card=None):
        if image_tokenizer is not None and token_generator is not None:
            if image_tokenizer.spec != token_generator.spec:
                raise ValueError(f"image_tokenizer.spec {image_tokenizer.spec} does not match "
                                 f"token_generator.spec {token_generator.spec}")
        if token_generator is not None and image_tokenizer is not None \
                and hasattr(token_generator, "bind_tokenizer"):
            token_generator.bind_tokenizer(image_tokenizer)  # next-scale models read scale inputs through it
        self.register_modules(image_tokenizer=image_tokenizer, token_generator=token_generator,
                              conditioner=conditioner)
        defaults = params_to_dict(params_from_dict(sampling_defaults))  # validates
        self.register_to_config(sampling_defaults=defaults)
        if card is not None:
            from tokenloom.pipelines.model_card import check_card

            self.register_to_config(card=check_card(card))
        if token_generator is not None and image_tokenizer is not None and hasattr(token_generator, "bind_tokenizer"):
            # a next-scale generator calls its tokenizer at every scale: offloading keeps the tokenizer on the
            # execution device rather than swapping the two models at every scale
            self.model_cpu_offload_seq = "conditioner->token_generator"
            self._exclude_from_cpu_offload = ["image_tokenizer"]

    # ---------------------------------------------------------------- device, precision, offload
    def enable_autocast(self, dtype: torch.dtype = torch.bfloat16) -> None:
        """Run the components under ``torch.autocast(device_type, dtype)`` (weights keep their dtype).

        ``dtype``: ``torch.bfloat16`` or ``torch.float16``; refused where the execution device cannot autocast
        to it (CUDA without bf16 support; devices without autocast).
        """
        self.autocast_dtype = check_autocast(self._execution_device, dtype)

    def disable_autocast(self) -> None:
        self.autocast_dtype = None

    def autocast(self):
        """The autocast context of :meth:`enable_autocast` (a no-op context when it is off)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = self._execution_device
        return torch.autocast(device_type=device.type, dtype=check_autocast(device, self.autocast_dtype))

    def component(self, name: str):
        """Component ``name``, moved to the execution device first when model CPU offload is on.

        diffusers' offload hooks fire on ``forward``; tokenloom components are called through ``encode``,
        ``generate`` and ``decode``, so the pipeline runs the hook's ``pre_forward`` itself (which also offloads
        the previous model of ``model_cpu_offload_seq``).
        """
        module = getattr(self, name)
        hook = getattr(module, "_hf_hook", None)
        if hook is not None and callable(getattr(hook, "pre_forward", None)):
            hook.pre_forward(module)
        return module

    def run_generator(self, cond, params: SamplingParams, gens, decoding=None, **kwargs) -> Tokens:
        """``token_generator.generate`` on the execution device, under :meth:`autocast`, with the progress bar."""
        generator = self.component("token_generator")
        with self.autocast():
            return generator.generate(cond, params, generator=gens, decoding=decoding, progress=self.show_progress,
                                      **kwargs)

    def encode_images(self, images: Tensor) -> Tokens:
        """``images: [B, 3, H, W]`` in ``[-1, 1]`` → the image tokenizer's tokens (execution device, autocast)."""
        tokenizer = self.component("image_tokenizer")
        dtype = next(tokenizer.parameters()).dtype
        with torch.no_grad(), self.autocast():
            return tokenizer.encode(images.to(self._execution_device, dtype))

    def sampling_params(self, sampling_params: SamplingParams | None = None, **overrides) -> SamplingParams:
        """The folder's default settings, replaced by ``sampling_params`` and then by non-None overrides."""
        if sampling_params is not None and not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        params = sampling_params or params_from_dict(self.config.sampling_defaults)
        changes = {k: v for k, v in overrides.items() if v is not None}
        return params.replace(**changes) if changes else params

    @staticmethod
    def check_count(num_images_per_prompt) -> int:
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        return num_images_per_prompt

    @staticmethod
    def check_output_type(output_type) -> str:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        return output_type

    @property
    def show_progress(self) -> bool:
        return not getattr(self, "_progress_bar_config", {}).get("disable", False)

    def tokens_to_output(self, tokens: Tokens, output_type: str, return_dict: bool, known_mask: Tensor | None = None):
        """Decode ``tokens`` and format them as ``output_type`` (then offloaded models go back to the CPU)."""
        if output_type == "tokens":
            self.maybe_free_model_hooks()
            out = TokenPipelineOutput(images=None, tokens=tokens, known_mask=known_mask)
            return out if return_dict else (None, tokens)
        tokenizer = self.component("image_tokenizer")
        with torch.no_grad(), self.autocast():
            images = tokenizer.decode(tokens.to(self._execution_device))
        self.maybe_free_model_hooks()
        images = ((images.float() + 1) / 2).clamp(0, 1).cpu()
        if output_type == "np":
            images = images.permute(0, 2, 3, 1).numpy()
        elif output_type == "pil":
            arr = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
            images = [Image.fromarray(a) for a in arr]
        out = TokenPipelineOutput(images=images, tokens=tokens, known_mask=known_mask)
        return out if return_dict else (images, tokens)


AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def check_autocast(device: torch.device, dtype) -> torch.dtype:
    """``dtype`` if ``torch.autocast`` on ``device`` supports it, else a ValueError naming both."""
    if dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast dtype must be one of {AUTOCAST_DTYPES}, got {dtype!r}")
    device = torch.device(device)
    if not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"torch.autocast is not available on device {device.type!r}")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"autocast dtype {dtype} is not supported by this GPU; use torch.float16")
    return dtype
