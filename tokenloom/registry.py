"""A small name → class registry, as timm has, shared by tokenizers, generators and heads.

Modules register their classes with ``@REGISTRY.register("name")``. ``available()`` and
``build()`` first import every module of the owning package, so a new part is found without
editing any import list.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import pkgutil


class Registry:
    """Names to classes for one package (``tokenloom.tokenizers``, ``tokenloom.generators``, ...)."""

    def __init__(self, package: str, what: str):
        self.package = package
        self.what = what
        self._classes: dict[str, type] = {}
        self._scanned = False

    def register(self, name: str):
        def deco(cls):
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.what} name {name!r} is already registered by {self._classes[name]}")
            self._classes[name] = cls
            cls.registry_name = name
            return cls

        return deco

    def _scan(self) -> None:
        if self._scanned:
            return
        pkg = importlib.import_module(self.package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=self.package + "."):
            importlib.import_module(info.name)
        self._scanned = True

    def available(self) -> list[str]:
        self._scan()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        self._scan()
        if name not in self._classes:
            close = difflib.get_close_matches(str(name), list(self._classes), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown {self.what} {name!r}{hint}; available: {sorted(self._classes)}")
        return self._classes[name]

    def build(self, name: str, **config):
        return self.get(name)(**config)

    def load(self, path: str, **kwargs):
        """A saved folder → ``from_pretrained`` of the registered class its ``config.json`` names (``_class_name``)."""
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise FileNotFoundError(f"{self.what} folder {path!r} has no config.json")
        with open(config) as f:
            class_name = json.load(f).get("_class_name")
        self._scan()
        classes = {cls.__name__: cls for cls in self._classes.values()}
        if class_name not in classes:
            raise ValueError(f"{self.what} folder {path!r} holds a {class_name!r}, not a registered {self.what} "
                             f"class ({sorted(classes)})")
        return classes[class_name].from_pretrained(path, **kwargs)
