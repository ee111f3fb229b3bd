"""Fresh random inputs that still rerun exactly: the ``rng`` fixture (one generator per test, from
support.fresh_seed) and, on any failure, the process's base seed in the report."""

from __future__ import annotations

import numpy as np
import pytest
from support import BASE_SEED, SEED_ENV, fresh_rng


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded fresh for this test (see support.fresh_seed)."""
    return fresh_rng(request.node.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("random seed", f"rerun with {SEED_ENV}={BASE_SEED} to draw the same inputs"))
