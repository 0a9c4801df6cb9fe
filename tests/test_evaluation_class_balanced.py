"""Class-balanced generation plans: complete, disjoint across processes, seeded per image."""

import types

import numpy as np
import pytest
import torch

from tokenloom.evaluation.class_balanced import (
    class_balanced_plan,
    image_seed,
    plan_for_accelerator,
    torch_generators,
)


# ----------------------------------------------------------------------------- class-balanced plans
@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_class_balanced_plan_is_complete_and_disjoint(world_size):
    num_classes, n_per_class = 5, 7
    plans = [
        class_balanced_plan(num_classes, n_per_class, world_size=world_size, rank=r, base_seed=3)
        for r in range(world_size)
    ]
    items = [it for plan in plans for it in plan]
    assert sorted(it.index for it in items) == list(range(num_classes * n_per_class))
    assert (
        np.bincount([it.label for it in items], minlength=num_classes).tolist() == [n_per_class] * num_classes
    )
    assert max(map(len, plans)) - min(map(len, plans)) <= 1
    assert len({it.seed for it in items}) == len(items)
    assert len({it.filename for it in items}) == len(items)
    single = {it.index: it for it in class_balanced_plan(num_classes, n_per_class, base_seed=3)}
    assert all(single[it.index] == it for it in items)  # same image whatever the number of processes


def test_class_balanced_plan_seeds_and_errors():
    a = class_balanced_plan(3, 2, base_seed=0)
    b = class_balanced_plan(3, 2, base_seed=1)
    assert not {it.seed for it in a} & {it.seed for it in b}
    assert a[4].seed == image_seed(0, 4) and 0 <= a[4].seed < 2**63
    assert [it.label for it in a] == [0, 1, 2, 0, 1, 2]
    fake_accelerator = types.SimpleNamespace(num_processes=2, process_index=1)
    assert plan_for_accelerator(fake_accelerator, 3, 2) == class_balanced_plan(3, 2, world_size=2, rank=1)
    gens = torch_generators(a[:2])
    assert (
        torch.rand(1, generator=gens[0]).item()
        == torch.rand(1, generator=torch.Generator().manual_seed(a[0].seed)).item()
    )
    for kwargs, match in [
        (dict(world_size=2, rank=2), "rank="),
        (dict(world_size=0), "world_size="),
        (dict(base_seed=-1), "base_seed="),
    ]:
        with pytest.raises(ValueError, match=match):
            class_balanced_plan(3, 2, **kwargs)
    with pytest.raises(ValueError, match="n_per_class="):
        class_balanced_plan(3, 0)
