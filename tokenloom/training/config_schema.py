"""Recipe files: YAML + dot-list overrides, and key checking with "did you mean" hints.

``load_recipe_file("configs/generator/x.yaml", ["train.lr=1e-4", "generator.depth=2"])`` reads the YAML and
applies the overrides (values parsed as YAML: ``train.max_minutes=null``, ``generator.ch_mult=[1,2]``).
``check_recipe(cfg, kind)`` then rejects keys that no part of the recipe reads, naming the key and the closest
valid one (``difflib``), before anything is built or trained: a typo such as ``train.max_step`` would otherwise
be silently ignored or fail far away.

Valid keys come from the code itself: the fields of the trainer's config dataclass for ``train``, the
constructor signature of the named data set / tokenizer / generator class for ``data`` / ``tokenizer`` /
``generator`` (a constructor taking ``**kwargs`` accepts anything). We wrote this instead of adopting OmegaConf:
the schema already exists as dataclasses and signatures, and one more dependency would buy little.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from pathlib import Path

import yaml


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-4`` is a float (YAML 1.1 needs ``1.0e-4`` and reads
    ``1e-4`` as a string, which would reach the optimiser as text)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text: str):
    """A command-line value as YAML (with :class:`RecipeLoader`'s floats)."""
    return yaml.load(text, Loader=RecipeLoader)


def apply_override(cfg: dict, assignment: str) -> None:
    """``"train.max_steps=200"`` → ``cfg["train"]["max_steps"] = 200`` (the value parsed as YAML)."""
    if "=" not in assignment:
        raise ValueError(f"an override must look like key.sub=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"an override must look like key.sub=value, got {assignment!r}")
    *parents, leaf = key.split(".")
    node = cfg
    for i, p in enumerate(parents):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {assignment!r}: {'.'.join(parents[:i + 1])} is a {type(child).__name__}, "
                             f"not a section")
        node = child
    node[leaf] = parse_value(value)


def load_recipe_file(path: str | Path, overrides: list[str] = ()) -> dict:
    """The YAML recipe at ``path`` with the dot-list ``overrides`` applied (in order)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    cfg = yaml.load(path.read_text(), Loader=RecipeLoader) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections, got {type(cfg).__name__}")
    for assignment in overrides:
        apply_override(cfg, assignment)
    return cfg


def unknown_key_error(where: str, key: str, valid) -> ValueError:
    """The error for ``key`` not being one of ``valid`` in section ``where`` (with the nearest valid key)."""
    valid = sorted(str(v) for v in valid)
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    hint = f" (did you mean {f'{where}.{close[0]}' if where else close[0]!r}?)" if close else ""
    full = f"{where}.{key}" if where else key
    return ValueError(f"unknown config key {full!r}{hint}; valid keys{f' in {where!r}' if where else ''}: {valid}")


def check_keys(section: dict, valid, where: str) -> None:
    """Raise :func:`unknown_key_error` for the first key of ``section`` not in ``valid``."""
    if not isinstance(section, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(section).__name__}: {section!r}")
    for key in section:
        if key not in valid:
            raise unknown_key_error(where, key, valid)


def dataclass_keys(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def signature_keys(cls) -> set[str] | None:
    """Keyword arguments ``cls(...)`` accepts; None when it takes ``**kwargs`` (anything goes)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL}


def check_named_section(section: dict, where: str, lookup, exclude: tuple[str, ...] = ()) -> None:
    """A ``{name: ..., <constructor arguments>}`` section: ``lookup(name)`` gives the class."""
    if not isinstance(section, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(section).__name__}: {section!r}")
    if "name" not in section:
        raise ValueError(f"config section {where!r} needs a 'name', got keys {sorted(section)}")
    keys = signature_keys(lookup(section["name"]))
    if keys is None:
        return
    valid = (keys - set(exclude)) | {"name"}
    check_keys(section, valid, where)


def _dataset_class(name: str):
    from tokenloom.training.data_sources import dataset_class

    return dataset_class(name)


def check_recipe(cfg: dict, kind: str) -> None:
    """Check a ``"tokenizer"`` or ``"generator"`` recipe's keys (see the module docstring)."""
    if kind == "tokenizer":
        from tokenloom import tokenizers
        from tokenloom.training.tokenizer_trainer import TrainConfig

        check_keys(cfg, {"tokenizer", "data", "eval_data", "train"}, "")
        if "tokenizer" in cfg:
            check_named_section(cfg["tokenizer"], "tokenizer", tokenizers.TOKENIZERS.get)
        check_keys(cfg.get("train", {}), dataclass_keys(TrainConfig), "train")
    elif kind == "generator":
        from tokenloom import generators
        from tokenloom.training.generator_trainer import GeneratorTrainConfig

        check_keys(cfg, {"tokenizer", "data", "generator", "train", "sampling"}, "")
        if "tokenizer" in cfg:
            check_keys(cfg["tokenizer"], {"path", "recipe"}, "tokenizer")
            if isinstance(cfg["tokenizer"].get("recipe"), dict):
                try:
                    check_recipe(cfg["tokenizer"]["recipe"], "tokenizer")
                except ValueError as err:
                    raise ValueError(f"in tokenizer.recipe: {err}") from err
        if "generator" in cfg:
            check_named_section(cfg["generator"], "generator", generators.GENERATORS.get, exclude=("token_spec",))
        check_keys(cfg.get("train", {}), dataclass_keys(GeneratorTrainConfig), "train")
    else:
        raise ValueError(f"kind must be 'tokenizer' or 'generator', got {kind!r}")
    for section in ("data", "eval_data"):
        if section in cfg:
            check_named_section(cfg[section], section, _dataset_class)


__all__ = ["RecipeLoader", "apply_override", "check_keys", "check_recipe", "load_recipe_file", "unknown_key_error"]
