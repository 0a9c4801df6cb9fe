"""Session fixtures of the evaluation tests: the built-in shapes extractor, shapes image folders and their features.

A pytest plugin (``pytest_plugins = ("evaluation_fixtures",)`` in each test module that uses them), so the fixtures
are registered once and each expensive one is built once per run, whichever evaluation test files run. Test modules
import constants and helpers from ``evaluation_helpers.py``, not from here (a plugin module must not be imported first).
"""

import os

import pytest
from evaluation_helpers import N_IMAGES, _names
from filelock import FileLock

from tokenloom.data.shapes import ShapesDataset
from tokenloom.evaluation.class_balanced import save_images
from tokenloom.evaluation.features import (
    extract_folder,
    load_feature_extractor,
    stack_dataset,
    train_feature_cnn,
)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory):
    """A folder shared by all pytest-xdist workers of this run, so each expensive fixture is built once."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp("evaluation_shared")
    root = tmp_path_factory.getbasetemp().parent / "evaluation_shared"  # this run's root, not earlier runs'
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def shapes_extractor(shared_dir):
    weights = shared_dir / "shapes_feature_cnn.safetensors"
    with FileLock(str(shared_dir / "extractor.lock")):
        if not weights.exists():
            train_feature_cnn("shapes", progress=False).save_safetensors(weights)
    return load_feature_extractor("shapes", weights)


@pytest.fixture(scope="session")
def shapes_folders(shared_dir):
    """PNG folders: shapes train / held-out test, and shifted copies of the held-out images."""
    root = shared_dir / "shapes_fid"
    names = ("train", "test", "channels_permuted", "colours_mixed", "inverted")
    with FileLock(str(shared_dir / "folders.lock")):
        if not (root / "complete").exists():
            train, _ = stack_dataset(ShapesDataset("train", num_samples=N_IMAGES))
            test, _ = stack_dataset(ShapesDataset("test", num_samples=N_IMAGES))
            sets = {
                "train": train,
                "test": test,
                "channels_permuted": test[:, [1, 2, 0]],  # R,G,B → G,B,R: the palette maps onto itself
                "colours_mixed": (test + test[:, [1, 2, 0]]) / 2,  # off-palette colours: a real shift
                "inverted": -test,  # white background, complementary colours: disjoint from the data
            }
            for name in names:
                save_images(sets[name], root / name, _names(N_IMAGES))
            (root / "complete").touch()
    return {name: root / name for name in names}


@pytest.fixture(scope="session")
def shapes_features(shapes_folders, shapes_extractor):
    return {
        name: extract_folder(path, shapes_extractor, verbose=False)[0]
        for name, path in shapes_folders.items()
    }
