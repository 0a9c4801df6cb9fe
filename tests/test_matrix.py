"""The generator × head × token-kind matrix (docs/matrix.md), cell by cell, from the table in scripts/make_matrix.py.

Supported cells: built from a config dict (tiny tokenizer + generator + head), 20 training steps lower the loss of the
training batch (same random draws before and after), a sample has the tokenizer's spec and decodes to images.
Unsupported cells: building the generator raises the error the table names. The document lists the same table.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tokenloom import generators
from tokenloom.tokens import Grid, TokenSpec

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_matrix", ROOT / "scripts" / "make_matrix.py")
matrix = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("make_matrix", matrix)  # dataclasses look their module up while the file executes
_spec.loader.exec_module(matrix)

SUPPORTED = [c for c in matrix.cells() if c.supported]
UNSUPPORTED = [c for c in matrix.cells() if not c.supported]


@pytest.mark.parametrize("cell", SUPPORTED, ids=[c.id for c in SUPPORTED])
def test_supported_cell_trains_samples_and_decodes(cell):
    config = matrix.cell_config(cell)
    result = matrix.run_cell(config)
    assert result["loss_after"] < 0.9 * result["loss_before"], (result["loss_before"], result["loss_after"])
    tokens, spec = result["tokens"], matrix.build_tokenizer(config["tokenizer"]).spec
    length = config["generate"].get("num_tokens", spec.length)
    assert tokens.spec == spec and tokens.data.shape == (2, length, spec.channels)
    images = result["images"]
    assert images.shape[:2] == (2, 3) and images.shape[2] == images.shape[3] and torch.isfinite(images).all()


@pytest.mark.parametrize("cell", UNSUPPORTED, ids=[c.id for c in UNSUPPORTED])
def test_unsupported_cell_fails_at_construction(cell):
    error, match = matrix.EXPECTED_ERRORS[(cell.family, cell.kind)]
    with pytest.raises(error, match=match):
        matrix.build_cell(matrix.cell_config(cell))


def test_every_cell_has_a_status_and_the_document_lists_the_table():
    assert len(matrix.cells()) == len(matrix.FAMILIES) * len(matrix.COLUMNS)
    assert set(matrix.EXPECTED_ERRORS) == set(matrix.UNSUPPORTED)
    doc = (ROOT / "docs" / "matrix.md").read_text()
    table = [line for line in matrix.render().splitlines() if line.startswith("| `") or line.startswith("- `")]
    assert len(table) == len(matrix.FAMILIES) + len(matrix.UNSUPPORTED)
    for line in table:
        assert line in doc, f"docs/matrix.md is out of date (run python scripts/make_matrix.py --run): {line}"


@pytest.mark.parametrize("family,head,spec", [
    ("raster_ar", "bitwise", TokenSpec(kind="index", vocab_size=8, layout=Grid(2, 2))),
    ("masked_ar", "diffusion", TokenSpec(kind="bits", bits=3, layout=Grid(2, 2))),
    ("random_order_ar", "categorical", TokenSpec(kind="continuous", dim=3, layout=Grid(2, 2))),
])
def test_a_head_of_another_token_kind_is_refused_naming_both(family, head, spec):
    config = {k: v for k, v in matrix.GENERATORS[family].items()}
    with pytest.raises(ValueError, match=rf"head '{head}' \(\w+\) models \('\w+',\) tokens but token_spec has "
                                         rf"kind='{spec.kind}'"):
        generators.build(family, token_spec=spec.to_dict(), num_classes=2, head=head, **config)
