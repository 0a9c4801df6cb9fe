"""What every text conditioner shares: the prompt check, the ``encode`` contract, and saving frozen encoders.

Contract (what pipelines, generators and trainers rely on, whichever conditioner they hold):

* ``encode(prompts) -> Condition`` with ``features: [B, feature_length, feature_dim]`` and ``mask: [B,
  feature_length]`` bool (True = a real token). ``output="tokens"`` gives per-token features;
  ``output="pooled"`` gives one pooled vector per prompt as ``[B, 1, D]`` (mask all True), so both fit the same
  ``Condition`` and the same ``TextPrefix(cond_dim=feature_dim, cond_len=feature_length)``.
* ``feature_dim`` and ``feature_length`` properties, known before any prompt is seen.

Frozen pretrained encoders (open_clip towers, transformers models) are built from a *local* path; nothing is
ever downloaded. diffusers' ``ModelMixin.from_pretrained`` would rebuild such a model from its config and then
look for its own weights file; these conditioners instead save a ``config.json`` whose ``pretrained`` entry says
where the weights are, and load by calling the constructor on that path:

* ``save_mode="copy"`` (default): ``save_pretrained`` copies the encoder's weights (and tokenizer) into the
  saved folder and records a path *relative* to it, so a pipeline folder is self-contained and movable.
* ``save_mode="reference"``: only the absolute path of the original weights is recorded (no copy: useful for
  multi-gigabyte T5 encoders shared by many pipeline folders); the folder then loads only where that path exists.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from tokenloom.modeling import TokenloomModel

OUTPUTS = ("tokens", "pooled")
SAVE_MODES = ("copy", "reference")
# diffusers' pipeline loader passes these to every ModelMixin component; they mean nothing for a frozen encoder
# rebuilt from a local path, so they are accepted and ignored when left at their "off" values.
_IGNORED_LOAD_KWARGS = ("low_cpu_mem_usage", "max_memory", "offload_folder", "offload_state_dict", "variant",
                        "use_safetensors", "use_flashpack", "disable_mmap", "quantization_config", "local_files_only",
                        "cache_dir", "force_download", "proxies", "token", "revision")


def check_prompts(prompt, name: str = "prompt") -> list[str]:
    """A string or a non-empty list of strings → list of strings; anything else is a TypeError/ValueError."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError(f"{name} must be a string or a non-empty list of strings, got an empty list")
        bad = [p for p in prompt if not isinstance(p, str)]
        if bad:
            raise TypeError(f"{name} must be a string or a list of strings, got an element {bad[0]!r}")
        return list(prompt)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_context_length(value, limit: int | None = None, name: str = "context_length") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"{name} must be an int >= 2 (room for start and end tokens), got {value!r}")
    if limit is not None and value > limit:
        raise ValueError(f"{name} must be at most {limit} (the encoder's position count), got {value}")


def existing_path(path, name: str = "pretrained") -> Path:
    """``path`` as a Path that exists; otherwise a ValueError naming the argument and the path (no download)."""
    if path is None or (isinstance(path, str) and not path):
        raise ValueError(f"{name} must be a local file or folder with the encoder's weights, got {path!r}")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"{name} must be a path (str), got {type(path).__name__}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{name} path {str(path)!r} does not exist (tokenloom never downloads weights: pass a local "
                         "file or folder)")
    return p


def pooled_as_condition_features(pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``pooled: [B, D]`` → (features ``[B, 1, D]``, mask ``[B, 1]`` all True)."""
    return pooled[:, None], torch.ones(pooled.shape[0], 1, dtype=torch.bool, device=pooled.device)


class TextConditioner(TokenloomModel):
    """Base of text conditioners: subclasses define ``encode``, ``feature_dim`` and ``feature_length``."""

    path_keys: tuple[str, ...] = ()  # config entries holding file paths (not part of the fingerprint)

    @property
    def feature_dim(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def feature_length(self) -> int:
        """``Lc`` of ``encode``'s features: the context length, or 1 for ``output="pooled"``."""
        return 1 if self.config.output == "pooled" else self.config.context_length

    def _tokenizer_fingerprint(self) -> str:
        """Whatever identifies the text tokenizer beyond the config (subclasses with file-based tokenizers)."""
        return ""

    def fingerprint(self) -> str:
        """sha256 over the class, the config (paths and save mode excluded: a copy is the same encoder), the tokenizer
        and every weight's bytes. Equal fingerprints: the same encoder function."""
        h = hashlib.sha256(type(self).__name__.encode())
        skip = {*self.path_keys, "save_mode"}  # where the weights are and how they are saved: not what they compute
        config = {k: v for k, v in self.config.items() if not k.startswith("_") and k not in skip}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        h.update(self._tokenizer_fingerprint().encode())
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


class PretrainedTextConditioner(TextConditioner):
    """A frozen text encoder built from a local path; saved by copy or by reference (see the module docstring).

    Subclasses set ``path_keys`` (config entries that hold paths) and implement ``_copy_weights(folder) ->
    {key: relative path}``.
    """

    path_keys = ("pretrained",)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        """Frozen: stays in eval mode (dropout off) whatever a trainer asks."""
        return super().train(False)

    def _copy_weights(self, folder: Path) -> dict[str, str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs):
        """Write ``config.json`` (and, for ``save_mode="copy"``, the weights); diffusers' saving kwargs are ignored."""
        if not is_main_process:
            return
        folder = Path(save_directory)
        if folder.is_file():
            raise ValueError(f"save_directory {str(save_directory)!r} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        config = json.loads(self.to_json_string())
        if self.config.save_mode == "copy":
            config.update(self._copy_weights(folder))
        else:
            for key in self.path_keys:
                if config.get(key) is not None:
                    config[key] = str(Path(config[key]).expanduser().resolve())
        (folder / self.config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, torch_dtype=None,
                        device_map=None, **kwargs):
        """Rebuild from a folder written by :meth:`save_pretrained` (paths inside it resolve relative to it)."""
        folder = Path(pretrained_model_name_or_path)
        if subfolder:
            folder = folder / subfolder
        config_path = folder / cls.config_name
        if not config_path.is_file():
            raise ValueError(f"{cls.__name__} folder {str(folder)!r} has no {cls.config_name} (a folder written by "
                             f"{cls.__name__}.save_pretrained is expected)")
        unknown = sorted(k for k in kwargs if k not in _IGNORED_LOAD_KWARGS)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected arguments {unknown}")
        if device_map is not None:
            raise ValueError(f"{cls.__name__} does not support device_map (got {device_map!r}); use .to(device)")
        config = json.loads(config_path.read_text())
        for key in cls.path_keys:
            value = config.get(key)
            if value is not None and not Path(value).expanduser().is_absolute():
                config[key] = str(folder / value)
        model = cls.from_config(config)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model
