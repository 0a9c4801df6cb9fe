"""Constants and small helpers that the evaluation tests import (the fixtures are in ``evaluation_fixtures.py``)."""

from pathlib import Path

N_IMAGES = 1000  # per folder: 64-dim features need > 64; more images shrink FID's finite-sample bias
ROOT = Path(__file__).resolve().parents[1]


def _to_255(x):
    """[-1, 1] → 0..255 float, rounded as the PNGs are."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def _names(n):
    return [f"{i:06d}.png" for i in range(n)]


def _no_download(*args, **kwargs):
    raise AssertionError("a download was attempted")
