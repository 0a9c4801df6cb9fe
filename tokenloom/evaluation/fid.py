"""Fréchet Inception Distance through clean-fid, with labelled results and ADM-style ``.npz`` statistics.

A FID number means nothing without the implementation and the feature extractor that made it, so
every result is a :class:`FIDResult` that carries both (``clean-fid 0.1.35``,
``inception-v3-2015-12-05/torchscript`` or ``tokenloom-shapes-cnn-v1:<fingerprint>``).

Features come from :func:`~tokenloom.evaluation.features.extract_folder` (clean-fid's folder
loader and resizer with the extractor as its ``custom_feat_extractor``); the distance is
``cleanfid.fid.frechet_distance``. Reference statistics are ``.npz`` files with ``mu [D]`` and
``sigma [D, D]`` — the layout of ADM's (guided-diffusion) reference batches, so their
``VIRTUAL_imagenet256_labeled.npz`` loads directly — plus, when we write them, the extractor's
label (``features``) and the image count (``n``), checked on load so statistics from a different
extractor are refused instead of silently compared.

The covariance of ``D``-dim features from ``N <= D`` images is singular and FID is then
meaningless; that is refused before any compute (the built-in extractors use ``D = 64``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from tokenloom.evaluation.features import CPU, FeatureExtractor, extract_folder


@lru_cache(maxsize=1)
def implementation() -> str:
    """``"clean-fid <version>"``: the FID implementation every result is labelled with."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"clean-fid {version('clean-fid')}"
    except PackageNotFoundError:  # pragma: no cover - clean-fid is a dependency
        return "clean-fid (unknown version)"


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``mu [D]`` and covariance ``sigma [D, D]`` of a feature set.

    ``features`` labels the extractor ("" when unknown, e.g. ADM's files); ``n`` counts the
    images (0 when unknown).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int = 0
    features: str = ""

    def __post_init__(self):
        mu, sigma = np.asarray(self.mu, dtype=np.float64), np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"mu of shape {mu.shape} and sigma of shape {sigma.shape}: expected [D] and [D, D]"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError("mu/sigma contain non-finite values")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, feats_ND: np.ndarray, features: str = "") -> FeatureStats:
        """Statistics of ``feats: [N, D]``; refuses ``N <= D`` (singular covariance)."""
        feats = np.asarray(feats_ND, dtype=np.float64)
        if feats.ndim != 2:
            raise ValueError(f"features of shape {feats.shape}: expected [N, D]")
        n, d = feats.shape
        if n <= d:
            raise ValueError(
                f"{n} images for {d}-dim features ({features or 'unlabelled'}): the covariance "
                f"would be singular; FID needs more than {d} images (use more images or an "
                "extractor with fewer feature dimensions)"
            )
        return cls(mu=feats.mean(axis=0), sigma=np.cov(feats, rowvar=False), n=n, features=features)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``mu``, ``sigma`` (ADM layout) and our ``features``/``n`` labels to an ``.npz``."""
        np.savez(path, mu=self.mu, sigma=self.sigma, features=np.array(self.features), n=np.array(self.n))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read an ``.npz`` with ``mu`` and ``sigma`` (ours or ADM's); no pickles are loaded."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics not found: {str(path)!r}")
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise ValueError(
                    f"{str(path)!r} has no {missing} arrays (has {data.files}); expected an ADM-style "
                    "npz with 'mu' and 'sigma'"
                )
            features = str(data["features"]) if "features" in data.files else ""
            n = int(data["n"]) if "n" in data.files else 0
            return cls(mu=data["mu"], sigma=data["sigma"], n=n, features=features)


@dataclass(frozen=True)
class FIDResult:
    """A labelled FID: the number, what computed it, on which features, from how many images."""

    value: float
    implementation: str
    features: str
    n_gen: int
    n_ref: int
    reference: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        n_ref = self.n_ref if self.n_ref else "?"
        return (
            f"FID {self.value:.4f} ({self.implementation}, features {self.features}, "
            f"{self.n_gen} generated vs {n_ref} reference images)"
        )


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """clean-fid's Fréchet distance between two Gaussians; refuses statistics of different extractors."""
    if a.dim != b.dim:
        raise ValueError(
            f"statistics of different feature dimensions: {a.dim} ({a.features or 'unlabelled'}) "
            f"vs {b.dim} ({b.features or 'unlabelled'})"
        )
    if a.features and b.features and a.features != b.features:
        raise ValueError(f"statistics from different feature extractors: {a.features!r} vs {b.features!r}")
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    return float(cleanfid_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


def folder_stats(
    folder: str | os.PathLike,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = CPU,
    verbose: bool = True,
) -> FeatureStats:
    """Statistics of every image under ``folder`` (write them with ``.save(path)`` for later comparisons)."""
    feats, _ = extract_folder(
        folder, extractor, batch_size=batch_size, num_workers=num_workers, device=device, verbose=verbose
    )
    return FeatureStats.from_features(feats, extractor.name)


def _stats(side: str, value, extractor: FeatureExtractor, **kw) -> tuple[FeatureStats, str]:
    """A folder, an ``.npz`` path or FeatureStats → (statistics, what they came from); labels checked."""
    if isinstance(value, FeatureStats):
        stats, name = value, "statistics"
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        stats = FeatureStats.load(path) if path.suffix == ".npz" else folder_stats(path, extractor, **kw)
        name = str(path)
    else:
        raise TypeError(f"{side}={value!r} must be an image folder, an .npz path or FeatureStats")
    if stats.features and stats.features != extractor.name:
        raise ValueError(
            f"{side} statistics {name!r} were made with {stats.features!r}, not with this "
            f"extractor {extractor.name!r}"
        )
    return stats, name


def compute_fid(
    generated: str | os.PathLike | FeatureStats,
    reference: str | os.PathLike | FeatureStats,
    extractor: FeatureExtractor,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = CPU,
    verbose: bool = True,
) -> FIDResult:
    """FID of generated against reference images, each an image folder, ``.npz`` or :class:`FeatureStats`.

    Folders go through ``extractor``; statistics labelled with another extractor are refused
    (ADM's unlabelled files are accepted when their dimension fits).
    """
    if not isinstance(extractor, FeatureExtractor):
        raise TypeError(f"extractor must be a FeatureExtractor, got {type(extractor).__name__}")
    kw = dict(batch_size=batch_size, num_workers=num_workers, device=device, verbose=verbose)
    ref, ref_name = _stats("reference", reference, extractor, **kw)
    gen, _ = _stats("generated", generated, extractor, **kw)
    if ref.dim != extractor.dim:
        raise ValueError(
            f"reference statistics {ref_name!r} have {ref.dim}-dim features; extractor "
            f"{extractor.name!r} gives {extractor.dim}"
        )
    return FIDResult(
        value=frechet_distance(gen, ref),
        implementation=implementation(),
        features=extractor.name,
        n_gen=gen.n,
        n_ref=ref.n,
        reference=ref_name,
    )
