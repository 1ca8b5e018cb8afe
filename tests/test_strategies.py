from __future__ import annotations

import numpy as np
import pytest
import torch

from ichmodel.strategies import (
    PoolPair,
    StrategyPlan,
    build_transfer_pool,
    make_transfer_batch,
    plan_strategies,
    transfer_labels,
)


def test_pool_follows_the_three_conditions() -> None:
    a = np.array(
        [
            [0, 1, 1, 0, 0],
            [0, 1, 1, 0, 1],  # (0 → 1): adds edh                          → pair
            [0, 1, 1, 0, 0],  # (1 → 2): loses a label                     → no
            [1, 0, 1, 0, 1],  # (2 → 3): one label more, but not a superset → no
            [1, 1, 1, 1, 1],  # (3 → 4): adds two labels                   → no
            [1, 1, 0, 1, 1],  # (4 → 5): loses a label                     → no
            [1, 1, 0, 1, 1],  # (5 → 6): identical                         → no
            [1, 1, 1, 1, 1],  # (6 → 7): adds sah                          → pair
        ]
    )
    b = np.array([[0, 0, 0, 0, 0], [1, 0, 0, 0, 0], [-1, -1, -1, -1, -1], [-1, -1, -1, -1, -1]])
    c = np.array([[0, 0, 0, 0, 0]])  # too short for a pair
    pool = build_transfer_pool([a, b, c])
    assert pool == [
        PoolPair(series_index=0, position=0, added_class=4),
        PoolPair(series_index=0, position=6, added_class=2),
        PoolPair(series_index=1, position=0, added_class=0),
    ]


def test_pool_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"\[T, L\]"):
        build_transfer_pool([np.zeros(5)])


def _plan(seed: int, lengths=(10, 7, 4, 1), **kw) -> StrategyPlan:
    args = {"p1": 0.3, "p2": 0.2, "epsilon": 1.0, "pool_size": 6} | kw
    return plan_strategies(torch.tensor(lengths), generator=torch.Generator().manual_seed(seed), **args)


def test_plan_counts_are_disjoint_and_inside_the_series() -> None:
    lengths = (10, 7, 4, 1)
    plan = _plan(0, lengths)
    assert plan.mask.shape == plan.transfer_slot.shape == (4, 10)
    assert plan.mask.dtype == torch.bool and plan.transfer_slot.dtype == torch.int64
    for b, m in enumerate(lengths):
        n1 = int(np.floor(m * 0.3 + 0.5))
        n2 = min(int(np.floor(m * 0.2 + 0.5)), m - n1)
        assert int(plan.mask[b].sum()) == n1
        assert int((plan.transfer_slot[b] >= 0).sum()) == n2
        assert not (plan.mask[b] & (plan.transfer_slot[b] >= 0)).any()  # disjoint
        assert not plan.mask[b, m:].any() and (plan.transfer_slot[b, m:] == -1).all()  # padding untouched
    assert plan.transfer_slot.max() < 6


def test_plan_is_deterministic_for_a_seed() -> None:
    a, b, c = _plan(5), _plan(5), _plan(6)
    assert torch.equal(a.mask, b.mask) and torch.equal(a.transfer_slot, b.transfer_slot)
    assert not (torch.equal(a.mask, c.mask) and torch.equal(a.transfer_slot, c.transfer_slot))


def test_plan_epsilon_and_empty_pool() -> None:
    none = _plan(0, epsilon=0.0)
    assert not none.mask.any() and (none.transfer_slot == -1).all()
    no_pool = _plan(0, pool_size=0)
    assert no_pool.mask.any() and (no_pool.transfer_slot == -1).all()
    # About half of many series are generated at ε = 0.5.
    many = plan_strategies(torch.full((400,), 10), 0.2, 0.2, 0.5, 3, torch.Generator().manual_seed(0))
    generated = many.mask.any(1)  # a generated series of 10 slices has round(10 · 0.2) = 2 masked
    assert 150 < int(generated.sum()) < 250
    assert torch.equal((many.transfer_slot >= 0).any(1), generated)


def test_plan_num_slices_and_validation() -> None:
    plan = _plan(0, lengths=(3, 2), num_slices=6)
    assert plan.mask.shape == (2, 6) and not plan.mask[:, 3:].any()
    with pytest.raises(ValueError, match="p1"):
        _plan(0, p1=1.5)
    with pytest.raises(ValueError, match="num_slices"):
        _plan(0, lengths=(3, 2), num_slices=2)


def test_transfer_labels_sets_exactly_the_added_classes() -> None:
    labels = torch.zeros(2, 3, 5)
    labels[0, 0, 1] = 1
    slot = torch.tensor([[0, -1, 2], [-1, 1, -1]])
    classes = torch.tensor([1, 3, 4])
    out = transfer_labels(labels, slot, classes)
    expected = labels.clone()
    expected[0, 0, 1] = 1  # already set: stays 1
    expected[0, 2, 4] = 1
    expected[1, 1, 3] = 1
    assert torch.equal(out, expected)
    assert labels.sum() == 1  # input untouched


def test_make_transfer_batch_keeps_only_used_pairs() -> None:
    plan = StrategyPlan(
        mask=torch.zeros(2, 4, dtype=torch.bool),
        transfer_slot=torch.tensor([[5, -1, 2, 5], [-1, 2, -1, -1]]),
    )
    pool_images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1, 1).expand(8, 2, 1, 2, 2).clone()
    pool_images[:, 1] += 100  # z2 differs from z1
    classes = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    tb = make_transfer_batch(plan, pool_images, classes)
    assert tb.num_pairs == 2
    assert tb.pair_images[:, 0, 0, 0, 0].tolist() == [2.0, 5.0]
    assert tb.pair_images[:, 1, 0, 0, 0].tolist() == [102.0, 105.0]
    assert tb.slot.tolist() == [[1, -1, 0, 1], [-1, 0, -1, -1]]
    assert tb.pair_classes.tolist() == [2, 0]
    # Both indexings give the same labels.
    labels = torch.zeros(2, 4, 5)
    assert torch.equal(
        transfer_labels(labels, plan.transfer_slot, classes),
        transfer_labels(labels, tb.slot, tb.pair_classes),
    )


def test_make_transfer_batch_without_transfer_is_empty() -> None:
    plan = _plan(0, pool_size=0)
    tb = make_transfer_batch(plan, torch.zeros(3, 2, 1, 4, 4), torch.tensor([0, 1, 2]))
    assert tb.num_pairs == 0 and (tb.slot == -1).all()
    with pytest.raises(ValueError, match="pool index"):
        make_transfer_batch(_plan(0, pool_size=10), torch.zeros(3, 2, 1, 4, 4), torch.tensor([0, 1, 2]))


def test_transfer_labels_reads_the_plan_on_the_host_only() -> None:
    # The plan is drawn on the host; a slot on a device would force a device → host read per step.
    labels = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match="host"):
        transfer_labels(labels, torch.tensor([[0, -1]], device="meta"), torch.tensor([1]))
