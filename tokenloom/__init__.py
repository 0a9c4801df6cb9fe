"""tokenloom: generate images from visual tokens, discrete and continuous.

Front door: ``tokenloom.pipeline(task, model=...)`` and ``tokenloom.load(path)``.
"""

__version__ = "0.1.0"

from tokenloom.config import GuidanceSchedule, SamplingParams  # noqa: E402
from tokenloom.tokens import Grid, Scales, Sequence, Tokens, TokenSpec  # noqa: E402


def pipeline(task: str, model=None, **kwargs):
    """Build the pipeline for ``task`` from a folder (``model``) or the packaged default."""
    from tokenloom.pipelines.registry import pipeline as _pipeline

    return _pipeline(task, model=model, **kwargs)


def load(path, **kwargs):
    """Load a pipeline folder, whatever its task."""
    from tokenloom.pipelines.registry import load as _load

    return _load(path, **kwargs)


__all__ = ["pipeline", "load", "SamplingParams", "GuidanceSchedule", "Grid", "Scales", "Sequence", "Tokens",
           "TokenSpec", "__version__"]
