"""Shared test fixtures."""
import os
from pathlib import Path

import pytest

# Under pytest-xdist (the README's `-n auto`) each worker computes on one CPU thread, and so do the commands its tests
# start: on a 2-core machine two workers then run side by side instead of both spreading over both cores. Set before
# torch is imported, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 - after the thread setting above

# The reference files sit in the workplace's shared folder next to the checkout; CI gets a copy beside its clone.
REFERENCE_DIR = Path(
    os.environ.get("SMIT_REFERENCE_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "smit_reference")
)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_DIR / "state_dict.pt").is_file():
        pytest.fail(f"SMIT reference files not found in {REFERENCE_DIR}; set SMIT_REFERENCE_DIR.")
    return REFERENCE_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
