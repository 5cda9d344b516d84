"""Ensemble probabilities, ECE (20 bins), NLL and the β grid against hand-computed cases."""

import math

import pytest
import torch

from bmm_cli.ensemble_metrics import (
    bin_index,
    ece,
    ensemble_probs,
    log_grid,
    metrics,
    paired_bootstrap_ece,
    paired_se,
    pick_best,
    row_nll,
)
from bmm_cli.errors import InputError


def test_ensemble_is_the_mean_of_softmax_not_softmax_of_mean():
    a = torch.tensor([[math.log(3.0), 0.0]])  # softmax (0.75, 0.25)
    b = torch.tensor([[0.0, math.log(9.0)]])  # softmax (0.1, 0.9)
    p = ensemble_probs([a, b])
    assert torch.allclose(p, torch.tensor([[0.425, 0.575]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ensemble_probs(a), torch.tensor([[0.75, 0.25]], dtype=torch.float64))
    with pytest.raises(InputError, match="NaN"):
        ensemble_probs([torch.tensor([[float("nan"), 0.0]])])


def test_ece_hand_computed():
    # conf 0.9 (right), 0.9 (wrong), 0.6 (right), 0.3 (right: three classes), 1.0 (right)
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.3, 0.3, 0.4], [1.0, 0.0, 0.0]],
                         dtype=torch.float64)
    labels = [0, 1, 1, 2, 0]
    # bins of width 0.05: (0.85, 0.9] holds rows 0, 1 (acc 0.5, conf 0.9); (0.55, 0.6] row 2 (1 vs 0.6);
    # (0.35, 0.4] row 3 (1 vs 0.4); (0.95, 1] row 4 (1 vs 1)
    want = (2 * abs(0.5 - 0.9) + abs(1 - 0.6) + abs(1 - 0.4) + 0) / 5
    assert ece(probs, labels) == pytest.approx(want, abs=1e-12)
    m = metrics(probs, labels)
    assert m["acc"] == pytest.approx(0.8) and m["n"] == 5
    want_nll = -(math.log(0.9) + math.log(0.1) + math.log(0.6) + math.log(0.4) + math.log(1.0)) / 5
    assert m["nll"] == pytest.approx(want_nll, abs=1e-12)


def test_bin_edges_are_right_closed():
    conf = torch.tensor([0.0, 0.05, 0.0500001, 0.5, 0.95, 0.9500001, 1.0], dtype=torch.float64)
    assert bin_index(conf).tolist() == [0, 0, 1, 9, 18, 19, 19]


def test_perfectly_calibrated_has_zero_ece_and_overconfident_does_not():
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert ece(probs, [0, 0, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert ece(probs, [0, 0, 1, 1]) == pytest.approx(0.25, abs=1e-12)


def test_nll_floors_zero_probability_and_checks_shapes():
    assert float(row_nll(torch.tensor([[1.0, 0.0]]), [1])[0]) == pytest.approx(-math.log(1e-12))
    with pytest.raises(InputError, match="do not match"):
        ece(torch.ones(3, 2) / 2, [0, 1])
    with pytest.raises(InputError, match="labels must lie"):
        ece(torch.ones(2, 2) / 2, [0, 2])


def test_paired_standard_errors():
    a = torch.tensor([1.0, 0.0, 1.0, 1.0])
    b = torch.tensor([0.0, 0.0, 1.0, 0.0])
    d = a - b
    assert paired_se(a, b) == pytest.approx(float(d.std() / 2))
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]] * 5)
    labels = [0, 1, 0, 1] * 5
    assert paired_bootstrap_ece(probs, probs, labels, reps=50) == 0.0
    assert paired_bootstrap_ece(probs, torch.full_like(probs, 0.5), labels, reps=200) > 0.0


def test_log_grid_and_pick_best():
    assert log_grid("1:100", 3) == [1.0, 10.0, 100.0]
    assert log_grid("3:300", 3) == [3.0, 30.0, 300.0]
    assert log_grid("5", 7) == [5.0]
    for bad in ("0:1", "a:b", "1:2:3", "1:inf"):
        with pytest.raises(InputError):
            log_grid(bad, 3)
    with pytest.raises(InputError, match="at least 2"):
        log_grid("1:10", 1)
    scores = [(1.0, 0.5), (10.0, 0.7), (100.0, 0.7), (1000.0, None)]
    assert pick_best(scores, minimize=False) == (100.0, 0.7)  # a tie goes to the larger β
    assert pick_best(scores, minimize=True) == (1.0, 0.5)
    with pytest.raises(InputError, match="every β evaluation failed"):
        pick_best([(1.0, None), (2.0, float("nan"))], minimize=True)
