"""Where diffusers' loader finds tokenloom components by class name.

A pipeline's ``model_index.json`` names each component as ``["tokenloom.components", "<ClassName>"]``.
diffusers resolves custom components as ``getattr(module, class_name)`` and decides how to load them by
looking up ``ModelMixin`` *in that same module*; this facade provides both, resolving class names
through the tokenizer, generator, conditioner and scorer registries, so pipeline folders do not depend on
which file a class lives in.
"""

from __future__ import annotations

from diffusers import ModelMixin  # noqa: F401  (diffusers' loader looks it up in this module)

LIBRARY = "tokenloom.components"


def _registries():
    from tokenloom.conditioning import CONDITIONERS
    from tokenloom.generators import GENERATORS
    from tokenloom.scoring import SCORERS
    from tokenloom.tokenizers import TOKENIZERS

    return (TOKENIZERS, GENERATORS, CONDITIONERS, SCORERS)


def component_class(class_name: str) -> type:
    """The registered tokenizer, generator, conditioner or scorer class called ``class_name``."""
    known = []
    for registry in _registries():
        for name in registry.available():
            cls = registry.get(name)
            if cls.__name__ == class_name:
                return cls
            known.append(cls.__name__)
    raise AttributeError(f"no tokenloom component class {class_name!r}; known: {sorted(known)}")


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return component_class(name)
