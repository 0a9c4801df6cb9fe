"""Decoding algorithms for ``generate(..., decoding=...)`` of the raster and random-order AR generators.

* :class:`SJD` — Speculative Jacobi Decoding: exact in distribution, fewer forward passes.
* :class:`LANTERN` — SJD with latent-neighbourhood relaxed acceptance; each token within TV ``delta`` of the model.
* :class:`GroupedSD` — SJD with dynamic-group relaxed acceptance (GSD); each token within TV ``delta``.
* :class:`ZipAR` — next-set decoding of raster grids (rows in parallel behind a window).
* :class:`ContinuousSD` — speculative decoding of continuous tokens with a draft model; exact for heads with a
  density (``"gaussian"``) and for diffusion heads through their denoising trajectories (:mod:`.trajectory`);
  flow heads with ``solver="sde"`` likewise (their ODE solvers have no density and are refused).
"""

from tokenloom.generators.decoding.base import Decoding, GridTarget, OrderedTarget, run_decoding
from tokenloom.generators.decoding.continuous_sd import ContinuousSD
from tokenloom.generators.decoding.grouped import GroupedSD
from tokenloom.generators.decoding.lantern import LANTERN
from tokenloom.generators.decoding.sjd import SJD
from tokenloom.generators.decoding.zipar import ZipAR

__all__ = ["ContinuousSD", "Decoding", "GridTarget", "GroupedSD", "LANTERN", "OrderedTarget", "SJD", "ZipAR",
           "run_decoding"]
