"""Evaluation: FID (clean-fid), Inception Score, precision/recall, CLIP score, GenEval layout and judge.

Import the module you need; this package imports nothing heavy on its own.

- ``fid``: :func:`~tokenloom.evaluation.fid.compute_fid` → labelled ``FIDResult``; ADM-style
  ``.npz`` statistics (``FeatureStats``).
- ``features``: feature extractors (built-in shapes/digits CNN, Inception-v3 from a local file)
  and the clean-fid folder pass.
- ``inception_score``, ``precision_recall``, ``clip_score``: the other sample-quality metrics.
- ``class_balanced``: class-balanced, per-rank-seeded generation plans for FID.
- ``geneval``, ``shapes_judge``: GenEval's folder layout and the shapes judge; ``reconstruction``:
  tokenizer reconstruction metrics.
"""
