"""Fuzzing in the suite: every loader, API entry point and the CLI answers bad input with a ValueError (or a
one-line CLI error), never another exception, a non-finite result or a hang. A few dozen inputs per target;
benchmarks/fuzz.py runs 10,000."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import TARGETS


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
def test_target_raises_only_value_error(target):
    @settings(max_examples=40, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(target.inputs)
    def check(value):
        try:
            target.run(value)
        except ValueError:
            pass

    check()
