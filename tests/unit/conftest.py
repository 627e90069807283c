"""Fixtures shared by the omni_core unit tests."""

from __future__ import annotations

import pytest

from omni_core import ModelStore


@pytest.fixture(scope="module")
def store():
    """One model store per test module: models load once there and never leak into another module."""
    return ModelStore()
