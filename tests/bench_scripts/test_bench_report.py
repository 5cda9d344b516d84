"""The benchmarks' row naming (shared by the MiniLM and decoder reports) and paired standard errors, on hand-made
cases."""

import math

import pytest

from bench.common import anchor_of, default_of
from bench.report import paired_acc_se


@pytest.mark.parametrize("name,anchor,default", [
    ("bmm-free-ta", "anchor-ta", None),
    ("bmm-data-tsv-const", "anchor-tsv", "bmm-data-tsv"),
    ("bmm-hybrid-tsv-search", "anchor-tsv", "bmm-hybrid-tsv"),
    ("bmm-free-tsv-search-rel", "anchor-tsv", "bmm-free-tsv"),
    ("bmm-free+x1-iso-cts", "anchor-iso-cts", "bmm-free-iso-cts"),
    ("bmm-free+fp64+aa-ta", "anchor-ta", "bmm-free-ta"),
    ("anchor-ties", None, None),
])
def test_row_names(name, anchor, default):
    assert anchor_of(name) == anchor and default_of(name) == default


def test_paired_acc_se_by_hand():
    """Two tasks of 4 rows: the difference of the mean-over-tasks accuracy and its SE (tasks independent)."""
    a = {"correct/x": "1101", "correct/y": "1111"}
    b = {"correct/x": "1001", "correct/y": "0110"}
    # task x: d = [0, 1, 0, 0], mean 0.25, var 0.25 -> SE² = 0.0625; task y: d = [1, 0, 0, 1], mean 0.5, var 1/3
    diff, se = paired_acc_se(a, b, ["x", "y"])
    assert diff == pytest.approx((0.25 + 0.5) / 2)
    assert se == pytest.approx(math.sqrt(0.25 / 4 + (1 / 3) / 4) / 2)
    assert paired_acc_se(a, {"correct/x": "1"}, ["x"]) is None  # other rows: no paired comparison
