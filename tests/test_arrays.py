"""The scalar-preserving helpers agree with numpy, NaN included, and keep Python numbers Python numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moeplan import arrays as A

VALUES = [0.0, 1.5, -2.0, 3, math.nan, math.inf]


@pytest.mark.parametrize("a", VALUES)
@pytest.mark.parametrize("b", VALUES)
def test_maximum_minimum_where_match_numpy_on_scalars_and_arrays(a, b):
    for ours, theirs in ((A.maximum, np.maximum), (A.minimum, np.minimum)):
        expected = theirs(a, b)
        got = ours(a, b)
        assert type(got) in (int, float) and (got == expected or (math.isnan(got) and np.isnan(expected)))
        np.testing.assert_array_equal(ours(np.array([a, b]), b), theirs(np.array([a, b]), b))
    for condition in (True, False):
        assert A.where(condition, a, b) is (a if condition else b)
        np.testing.assert_array_equal(A.where(np.array([condition]), a, b), np.where([condition], a, b))


def test_gcd_matches_numpy():
    assert A.gcd(12, 18) == 6 and type(A.gcd(12, 18)) is int
    np.testing.assert_array_equal(A.gcd(np.array([12, 7, 0]), 18), np.gcd([12, 7, 0], 18))
