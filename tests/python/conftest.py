"""Shared fixtures of the Python tests (run by scripts/test-python.sh)."""

import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

ROOT = pathlib.Path(__file__).resolve().parents[2]


def pytest_configure(config):
    # The tests' torch ops are tiny: one torch thread is fastest, and it keeps torch's spinning
    # OpenMP workers from fighting altgrad's own rayon threads on a small (shared) machine.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cli():
    """Path of the altgrad binary (built by `cargo build --release` / `cargo test --release`):
    $ALTGRAD_BIN, else $CARGO_TARGET_DIR/release/altgrad, else target/release/altgrad."""
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    p = pathlib.Path(os.environ.get("ALTGRAD_BIN", target / "release" / "altgrad"))
    if not p.is_file():
        pytest.skip(f"the altgrad binary is not built ({p}); run cargo build --release")
    return str(p)


def randn(*shape, dtype=torch.float64, requires_grad=True):
    return torch.randn(*shape, dtype=dtype, requires_grad=requires_grad)
