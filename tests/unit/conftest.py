"""Fixtures shared by the omni_core unit tests."""

from __future__ import annotations

import pytest

from omni_core import ModelStore


@pytest.fixture(scope="module")
def store():
    """One model store per test module: models load once there and never leak into another module."""
    return ModelStore()


@pytest.fixture()
def small_edit_references(monkeypatch):
    """Edit pipelines scale every input image to about 1 MP (4096 reference tokens on the tiny models, ~5 s per
    transformer call on 2 cores): here to 1/256 of that area, as if the model were made for 64x64 pictures.
    The families read the same function for their token counts, so budgets stay consistent."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus):
        full_size = module.calculate_dimensions
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, full_size=full_size: full_size(area // 256, ratio))
