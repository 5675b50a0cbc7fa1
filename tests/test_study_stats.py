"""The study's statistics (experiments/_stats.py): what a multi-seed table's verdicts rest on."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

from _stats import mean_sd, paired_interval, t975, verdict  # noqa: E402


def test_paired_interval_matches_a_hand_computed_t_interval():
    # diffs 0.02, 0.04, 0.03: mean 0.03, sd 0.01, half-width 4.303 * 0.01 / sqrt(3) = 0.02484
    mean, low, high = paired_interval([0.72, 0.74, 0.73], [0.70, 0.70, 0.70])
    assert mean == pytest.approx(0.03)
    assert (low, high) == (pytest.approx(0.03 - 0.024844, abs=1e-5), pytest.approx(0.03 + 0.024844, abs=1e-5))
    assert verdict(low, high) == "better"


def test_pairing_removes_the_seed_effect_that_an_unpaired_view_would_keep():
    # a variant always 1 point below its reference, on seeds that differ by 10 points: clearly worse
    full = [0.60, 0.70, 0.80]
    ablated = [v - 0.01 for v in full]
    mean, low, high = paired_interval(ablated, full)
    assert mean == pytest.approx(-0.01) and high < 0 and verdict(low, high) == "worse"
    # a noisy difference straddling zero is no evidence either way
    assert verdict(*paired_interval([0.70, 0.66, 0.71], [0.69, 0.69, 0.69])[1:]) == "no evidence"


def test_small_samples_and_bad_input():
    assert t975(2) == 4.303 and t975(100) == 1.96
    assert mean_sd([0.5]) == (0.5, None)
    with pytest.raises(ValueError, match="at least 2"):
        paired_interval([0.5], [0.4])
    with pytest.raises(ValueError, match="degree of freedom"):
        t975(0)
