"""cl_metrics on hand-worked matrices (DESIGN.md definitions)."""

import pytest

from jaxcl.eval import cl_metrics

R = [
    [0.8, 0.1, 0.0],
    [0.6, 0.9, 0.2],
    [0.5, 0.7, 0.95],
]
BASE = [0.05, 0.1, 0.15]


def test_metrics_by_hand():
    m = cl_metrics(R, BASE)
    assert m["op"] == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    # GEM BWT over the first T-1 tasks: ((0.5-0.8) + (0.7-0.9)) / 2 = -0.25
    assert m["bwt"] == pytest.approx(-0.25)
    # TRACE: the same sum over all T tasks, divided by T: (-0.3 - 0.2 + 0) / 3
    assert m["bwt_trace"] == pytest.approx(-0.5 / 3)
    # FWT: R[0][1] - b1 = 0.0, R[1][2] - b2 = 0.05 -> 0.025
    assert m["fwt"] == pytest.approx(0.025)
    # forgetting: task0 max(0.8, 0.6) - 0.5 = 0.3; task1 max(0.1, 0.9) - 0.7 = 0.2
    assert m["forgetting"] == pytest.approx(0.25)


def test_forgetting_uses_the_peak_not_the_diagonal():
    r = [[0.2, 0.0, 0.0], [0.6, 0.5, 0.0], [0.4, 0.5, 0.9]]
    m = cl_metrics(r)
    assert m["bwt"] == pytest.approx(((0.4 - 0.2) + (0.5 - 0.5)) / 2)  # positive transfer
    assert m["forgetting"] == pytest.approx(((0.6 - 0.4) + (0.5 - 0.5)) / 2)
    assert m["fwt"] is None  # no baseline


def test_lower_is_better_flips_the_sign_of_differences():
    ppl = [[2.0, 90.0], [40.0, 3.0]]
    m = cl_metrics(ppl, [100.0, 100.0], higher_is_better=False)
    assert m["op"] == pytest.approx(21.5)
    assert m["bwt"] == pytest.approx(-(40.0 - 2.0))  # forgetting reads as negative bwt
    assert m["forgetting"] == pytest.approx(38.0)
    assert m["fwt"] == pytest.approx(100.0 - 90.0)  # lower perplexity before training = gain


def test_single_task_and_bad_shapes():
    m = cl_metrics([[0.5]], [0.1])
    assert m == {"op": 0.5, "bwt": None, "bwt_trace": 0.0, "fwt": None, "forgetting": None}
    with pytest.raises(ValueError, match="square"):
        cl_metrics([[1.0, 2.0]])
    with pytest.raises(ValueError, match="baseline must have 2"):
        cl_metrics([[1.0, 0.0], [1.0, 1.0]], [0.0])
