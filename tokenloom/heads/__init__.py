"""Heads: categorical (incl. bitwise and factorised), diffusion loss, flow matching."""

from tokenloom.heads.base import Head
from tokenloom.registry import Registry

HEADS = Registry("tokenloom.heads", "head")
available = HEADS.available
build = HEADS.build
register = HEADS.register

__all__ = ["Head", "available", "build", "register"]
