"""Fresh random inputs that still rerun exactly: the ``rng`` fixture (one generator per test, from
support.fresh_seed) and, on any failure, the process's base seed in the report; the ``be`` and
``backend_name`` fixtures that run a test on every installed backend; Triton's interpreter where
there is no GPU."""

from __future__ import annotations

import os

import numpy as np
import pytest
from support import BACKENDS, BASE_SEED, SEED_ENV, backend_available, fresh_rng, make_backend, whole_blocks


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# Without a GPU the Triton kernels run through Triton's interpreter (on CPU tensors); it reads this
# when a kernel is decorated, so it is set before any test module imports them.
if not _cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_fault() -> str | None:
    """Why Triton's interpreter cannot run fmoe's kernels here, or None. Triton 3.9.0's gives a mask
    made by ``&`` of a boolean vector and a broadcast boolean scalar an int8 array, which its loads
    refuse ("mask has unsupported dtype"); the kernels combine masks so throughout."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import torch
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def probe(x, s):
        r = tl.arange(0, 4)
        tl.store(x + r, tl.load(x + r, mask=(r < 3) & (tl.load(s) != 0), other=0.0) + 1.0)

    try:
        probe[(1,)](torch.zeros(4), torch.ones(1, dtype=torch.int32))
    except Exception as e:  # the interpreter's own error, whatever its type
        return f"Triton {triton.__version__}'s interpreter cannot run the kernels ({e}); install triton<3.9"
    return None


def pytest_configure(config: pytest.Config) -> None:
    fault = _interpreter_fault()
    if fault is not None:
        pytest.exit(fault, returncode=2)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded fresh for this test (see support.fresh_seed)."""
    return fresh_rng(request.node.nodeid)


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    """Each backend of the conformance suite in turn; one that is not available here is skipped."""
    if not backend_available(request.param):
        pytest.skip(f"{request.param}: not available here (its package is not installed, or no GPU)")
    if request.param == "torch-cpu-triton" and request.node.get_closest_marker("not_interpreted"):
        # Triton's interpreter runs a kernel's every program in Python: the whole network on it takes
        # minutes on two cores, so the suite runs it where a case takes a path no other case takes
        pytest.skip("torch-cpu-triton: this case's ops and paths are covered by its other cases")
    if request.param == "torch-cpu-triton":
        whole_blocks(request.getfixturevalue("monkeypatch"))
    return str(request.param)


@pytest.fixture
def be(backend_name: str) -> object:
    """A fresh instance of each backend of the conformance suite."""
    return make_backend(backend_name)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("random seed", f"rerun with {SEED_ENV}={BASE_SEED} to draw the same inputs"))
