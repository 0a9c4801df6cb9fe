"""The task registry behind ``tokenloom.pipeline(task, model=...)``, like ``transformers.pipeline``."""

from __future__ import annotations

import difflib
import importlib
import json
import os
from pathlib import Path

_TASKS: dict[str, type] = {}
_MODULES = ("class_to_image", "text_to_image", "unconditional", "reconstruction", "inpainting", "variation")


def register_pipeline(task: str):
    """Class decorator: make ``cls`` the pipeline of ``task``."""

    def deco(cls):
        _TASKS[task] = cls
        cls.task = task
        return cls

    return deco


def _load_tasks() -> None:
    for name in _MODULES:
        importlib.import_module(f"tokenloom.pipelines.{name}")


def tasks() -> list[str]:
    _load_tasks()
    return sorted(_TASKS)


def pipeline_class(task: str) -> type:
    _load_tasks()
    if task not in _TASKS:
        close = difflib.get_close_matches(str(task), list(_TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown task {task!r}{hint}; available tasks: {sorted(_TASKS)}")
    return _TASKS[task]


def default_model(task: str) -> Path:
    """The folder used when no ``model`` is given: the packaged default, or ``$TOKENLOOM_DEFAULT_MODEL``."""
    env = os.environ.get("TOKENLOOM_DEFAULT_MODEL")
    if env:
        return Path(env)
    path = Path(__file__).resolve().parent.parent / "assets" / "default" / task
    if not (path / "model_index.json").exists():
        raise ValueError(f"no default model ships for task {task!r}; pass model=<pipeline folder>")
    return path


def import_components(path: Path) -> dict:
    """Import the tokenloom modules a folder's ``model_index.json`` names (diffusers loads only imported ones)."""
    index = json.loads((path / "model_index.json").read_text())
    for value in index.values():
        if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) \
                and value[0].startswith("tokenloom."):
            importlib.import_module(value[0])
    return index


def _check_folder(path: Path, cls: type) -> None:
    index = path / "model_index.json"
    if not path.is_dir() or not index.exists():
        raise ValueError(f"model must be a pipeline folder containing model_index.json, got {str(path)!r}")
    class_name = import_components(path).get("_class_name")
    if isinstance(class_name, list):
        class_name = class_name[-1]
    if class_name != cls.__name__:
        raise ValueError(f"model folder {str(path)!r} holds a {class_name}, not a {cls.__name__} "
                         f"(task {cls.task!r})")


def pipeline(task: str, model=None, **kwargs):
    """Build the pipeline of ``task`` from a folder path, a pipeline object, or the packaged default."""
    cls = pipeline_class(task)
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if not isinstance(model, cls):
            raise TypeError(f"model must be a folder path or a {cls.__name__}, got {type(model).__name__}")
        return model
    path = Path(model) if model is not None else default_model(task)
    _check_folder(path, cls)
    return cls.from_pretrained(str(path), **kwargs)


def load(path, **kwargs):
    """Load any pipeline folder, choosing the class from its ``model_index.json``."""
    path = Path(path)
    index = path / "model_index.json"
    if not index.exists():
        raise ValueError(f"path must be a pipeline folder containing model_index.json, got {str(path)!r}")
    class_name = import_components(path).get("_class_name")
    if isinstance(class_name, list):
        class_name = class_name[-1]
    _load_tasks()
    for cls in _TASKS.values():
        if cls.__name__ == class_name:
            return cls.from_pretrained(str(path), **kwargs)
    raise ValueError(f"{str(path)!r} holds a {class_name!r}, which is no tokenloom pipeline; known: "
                     f"{sorted(c.__name__ for c in _TASKS.values())}")
