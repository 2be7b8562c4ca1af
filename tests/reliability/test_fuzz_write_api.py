"""Hypothesis fuzzing of the write API (issue 23): random dtypes, shapes, NaN/Inf, negative, huge,
empty, wrong lengths, unknown layers and modes. Every call either raises InvalidInputError or writes
rows that read back identically through chrono.connect and chrono.read; an independent oracle says
which calls must be refused or accepted; `chrono snapshot` then works. See fuzz_write_api.py."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from tests.reliability.conftest import load_sibling

F = load_sibling("fuzz_write_api")
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.data_too_large])


@settings(max_examples=25, **_SETTINGS)
@given(F.calls)
def test_write_api_fuzz(case):
    F.run_case(case)


@pytest.mark.slow
@settings(max_examples=300, **_SETTINGS)
@given(F.calls)
def test_write_api_fuzz_slow(case):
    F.run_case(case)
