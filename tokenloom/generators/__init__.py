"""Generators: raster AR, random-order AR, masked AR, next-scale, block diffusion."""

from tokenloom.generators.base import TokenGenerator
from tokenloom.generators.condition import Condition, as_condition
from tokenloom.registry import Registry

GENERATORS = Registry("tokenloom.generators", "generator")
available = GENERATORS.available
build = GENERATORS.build
register = GENERATORS.register

__all__ = ["TokenGenerator", "Condition", "as_condition", "available", "build", "register"]
