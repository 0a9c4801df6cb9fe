"""nearest_code: every backend returns exactly the reference's indices, ties included (lowest index wins)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tokenloom.kernels.nearest_code import (  # noqa: E402
    canonical_scores,
    code_norms,
    nearest_code,
    nearest_code_reference,
    nearest_code_torch,
)
from tokenloom.kernels.triton_nearest_code import nearest_code_triton  # noqa: E402


def _all_backends(z, codebook, block_n=16, block_k=32):
    """Indices from every path, with small blocks so that row and code blocking is exercised."""
    return {
        "torch": nearest_code_torch(z, codebook, block_n=block_n, block_k=block_k),
        "torch-small-groups": nearest_code_torch(z, codebook, block_n=block_n, block_k=block_k, group=8),
        "torch-default": nearest_code(z, codebook, backend="torch"),
        "triton": nearest_code_triton(z, codebook, block_n=16, block_k=32),
        "auto": nearest_code(z, codebook),
    }


@pytest.mark.parametrize("n,k,d", [(1, 1, 1), (37, 100, 8), (50, 257, 3), (64, 64, 16), (5, 700, 8)])
def test_random_inputs_match_reference(n, k, d):
    g = torch.Generator().manual_seed(n * 1000 + k + d)
    z, codebook = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    ref = nearest_code_reference(z, codebook)
    # The reference is the true nearest code (checked in float64 with an independent formula).
    dist = torch.cdist(z.double(), codebook.double()).pow(2)
    assert torch.equal(dist.gather(1, ref[:, None]).squeeze(1), dist.min(dim=1).values)
    for name, got in _all_backends(z, codebook).items():
        assert torch.equal(got, ref), name


def test_exact_ties_go_to_the_lowest_index():
    # Small integers: every score is exact, so ties are real ties in any summation order.
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-2, 3, (40, 4), generator=g).float()
    codebook = torch.cat([base, base, base])  # each code appears at i, i + 40, i + 80
    z = torch.randint(-2, 3, (60, 4), generator=g).float()
    ref = nearest_code_reference(z, codebook)
    assert int(ref.max()) < 40  # the first copy always wins
    scores = canonical_scores(z, codebook, code_norms(codebook))
    first_min = (scores == scores.min(dim=1, keepdim=True).values).float().argmax(dim=1)
    assert torch.equal(ref, first_min)
    for name, got in _all_backends(z, codebook, block_n=7, block_k=13).items():
        assert torch.equal(got, ref), name


def test_equidistant_codes_tie_across_blocks():
    # z = 0 is equidistant from every unit code: the answer is index 0 whatever the block boundaries.
    codebook = torch.eye(8).repeat(9, 1)  # 72 codes of norm 1
    z = torch.zeros(5, 8)
    for name, got in _all_backends(z, codebook, block_n=2, block_k=5).items():
        assert got.tolist() == [0] * 5, name
    # z on the bisector of codes 3 and 7 (later codes are farther): ties broken to 3.
    codebook = torch.randn(10, 4, generator=torch.Generator().manual_seed(1)) * 5
    codebook[3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    codebook[7] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    z = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert nearest_code_reference(z, codebook).item() == 3
    for name, got in _all_backends(z, codebook, block_n=1, block_k=4).items():
        assert got.item() == 3, name


def test_near_ties_below_matmul_rounding_are_resolved_like_the_reference():
    # Pairs of codes whose scores differ by about one float32 ulp: the BLAS screening cannot tell them
    # apart, so these rows must go through the canonical re-decision and still match exactly.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(30, 8, generator=g)
    nudged = base + torch.randn(30, 8, generator=g) * 1e-7
    codebook = torch.cat([base, nudged])
    z = base[torch.randint(0, 30, (100,), generator=g)] + torch.randn(100, 8, generator=g) * 1e-3
    ref = nearest_code_reference(z, codebook)
    for name, got in _all_backends(z, codebook, block_n=8, block_k=16).items():
        assert torch.equal(got, ref), name


def test_float64_and_half_inputs():
    g = torch.Generator().manual_seed(4)
    z, codebook = torch.randn(30, 8, generator=g), torch.randn(90, 8, generator=g)
    ref64 = nearest_code_reference(z.double(), codebook.double())
    assert torch.equal(nearest_code_torch(z.double(), codebook.double(), block_k=32), ref64)
    ref16 = nearest_code_reference(z.half(), codebook.half())  # upcast to float32
    assert torch.equal(nearest_code(z.half(), codebook.half()), ref16)
    assert torch.equal(nearest_code_triton(z.half(), codebook.half()), ref16)
    with pytest.raises(TypeError, match="float32"):
        nearest_code_triton(z.double(), codebook.double())


def test_empty_rows():
    codebook = torch.randn(4, 3)
    for backend in ("reference", "torch", "triton"):
        out = nearest_code(torch.zeros(0, 3), codebook, backend=backend)
        assert out.shape == (0,) and out.dtype == torch.long


@pytest.mark.parametrize(
    "z,codebook,backend,err,match",
    [
        (torch.zeros(3, 4), torch.zeros(5, 3), None, ValueError, "same dim"),
        (torch.zeros(3), torch.zeros(5, 3), None, ValueError, "2-D"),
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(5, 4), None, TypeError, "float"),
        (torch.zeros(3, 4), torch.zeros(0, 4), None, ValueError, "K, D >= 1"),
        (torch.full((3, 4), float("nan")), torch.zeros(5, 4), "torch", ValueError, "NaN"),
        (torch.zeros(3, 4), torch.zeros(5, 4), "cuda", ValueError, "backend"),
    ],
)
def test_bad_inputs_raise(z, codebook, backend, err, match):
    with pytest.raises(err, match=match):
        nearest_code(z, codebook, backend=backend)
