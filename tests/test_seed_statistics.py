"""experiments/seed_statistics.py against hand-computed cases."""

import math

import pytest
from seed_statistics import differs, paired_speedups, spread, time_to_accuracy


def test_spread_mean_sample_std_and_standard_error():
    s = spread([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["n"] == 4
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))  # (2.25 + 0.25 + 0.25 + 2.25) / 3
    assert s["se"] == pytest.approx(math.sqrt(5 / 3) / 2)
    one = spread([7.0, math.nan, None])  # missing values do not count
    assert one["mean"] == 7.0 and one["n"] == 1 and math.isnan(one["std"]) and math.isnan(one["se"])
    assert spread([])["n"] == 0 and math.isnan(spread([])["mean"])


def test_a_difference_only_beyond_two_standard_errors():
    a = [10.0, 11.0, 12.0]  # mean 11, se 1/sqrt(3); the difference's se sqrt(2/3) = 0.816
    assert differs(a, [13.0, 14.0, 15.0])  # 3 > 1.633
    assert not differs(a, [11.5, 12.5, 13.5])  # 1.5 < 1.633
    assert differs([13.0, 14.0, 15.0], a)  # symmetric
    assert not differs([1.0], [100.0])  # one seed: no standard error, no claim


def test_time_to_accuracy_interpolates_between_validation_points():
    assert time_to_accuracy([10, 20, 30], [0.1, 0.3, 0.5], 0.4) == pytest.approx(25.0)
    assert time_to_accuracy([10, 20, 30], [0.1, 0.3, 0.5], 0.05) == 10  # at once
    assert time_to_accuracy([10, 20, 30], [0.1, 0.3, 0.5], 0.5) == pytest.approx(30.0)
    assert time_to_accuracy([10, 20, 30], [0.1, 0.3, 0.5], 0.6) is None
    # the first crossing counts, not a later one
    assert time_to_accuracy([1, 2, 3, 4], [0, 1, 0, 1], 0.5) == pytest.approx(1.5)


def test_paired_speedups_seed_by_seed():
    base = {0: (40.0, 100.0), 1: (50.0, 120.0), 2: (45.0, 90.0), 4: (1.0, 1.0)}
    masked = {
        0: ([10, 20, 30], [10, 30, 50]),  # reaches 40 at 25: 100 / 25 = 4
        1: ([10, 20, 30], [20, 40, 60]),  # reaches 50 at 25: 120 / 25 = 4.8
        2: ([10, 20], [10, 20]),  # never reaches 45
        3: ([10], [99]),  # no mask-0 run of seed 3: not paired
    }
    res = paired_speedups(base, masked)
    assert res["missed"] == [2]
    assert res["speedup"]["mean"] == pytest.approx(4.4) and res["speedup"]["n"] == 2
    assert res["speedup"]["std"] == pytest.approx(math.sqrt(2 * 0.4**2))
    assert res["speedup"]["se"] == pytest.approx(0.4)
    assert res["time"]["mean"] == pytest.approx(25.0) and res["time"]["std"] == 0.0
