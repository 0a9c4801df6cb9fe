"""Precision / recall (Kynkäänniemi et al.): a hand example and the shapes folders."""

import numpy as np
import pytest

from tokenloom.evaluation.precision_recall import in_manifold, knn_radii, precision_recall

pytest_plugins = ("evaluation_fixtures",)  # the session fixtures on the shapes folders, built once per run


# ----------------------------------------------------------------------------- precision / recall
def test_precision_recall_hand_example():
    ref = np.array([[0.0], [1.0], [2.0], [10.0]])
    # k=1 radii: 1, 1, 1, 8 (10's nearest other point is 2)
    np.testing.assert_allclose(knn_radii(ref, k=1).numpy(), [1, 1, 1, 8])
    gen = np.array(
        [[2.5], [30.0], [-1.0], [19.0]]
    )  # inside: 2.5 (ball of 2), -1 (ball of 0); 19 outside (10+8=18)
    assert in_manifold(gen, ref, knn_radii(ref, k=1)).tolist() == [True, False, True, False]
    pr = precision_recall(gen, ref, k=1)
    assert pr.precision == 0.5
    # gen k=1 radii: 2.5→3.5 (to -1), 30→11 (to 19), -1→3.5, 19→11 (to 30):
    # ref 0, 1, 2 lie in the balls of -1 and 2.5; 10 lies in 19's ball
    assert pr.recall == 1.0
    with pytest.raises(ValueError, match="k="):
        knn_radii(ref, k=4)


def test_precision_recall_on_shapes(shapes_features):
    f = shapes_features
    itself = precision_recall(f["test"], f["test"], features="shapes")
    held_out = precision_recall(f["test"], f["train"])
    disjoint = precision_recall(f["inverted"], f["train"])
    print(f"\nitself: {itself}\nheld-out vs train: {held_out}\ninverted vs train: {disjoint}")
    assert itself.precision == 1.0 and itself.recall == 1.0
    assert held_out.precision > 0.8 and held_out.recall > 0.8
    assert disjoint.precision < 0.2 and disjoint.recall < 0.2
