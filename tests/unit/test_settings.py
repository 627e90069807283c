"""Each default, range and tooltip is declared once, in the core; values of the wrong kind are refused."""

from __future__ import annotations

import math

import pytest

from omni_core import DecodeOptions, GenerationRequest, InvalidInput
from omni_core.cache.cachedit import CacheDiT
from omni_core.cache.teacache import TeaCache
from omni_core.offload.layerwise import LayerwiseOffload
from omni_core.parallel.layout import ParallelConfig
from omni_core.quant.fp8 import FP8Quantize
from omni_core.settings import Setting, from_user_values, settings_of

CONFIGS = (TeaCache, CacheDiT, FP8Quantize, LayerwiseOffload, ParallelConfig, GenerationRequest, DecodeOptions)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_the_declared_defaults_are_the_dataclass_defaults(config):
    declared = settings_of(config)
    assert declared and all(len(s.tooltip) > 15 for s in declared.values()), "every setting says what it does"
    assert from_user_values(config, **{name: s.default for name, s in declared.items()}) == config()
    for name, setting in declared.items():
        if setting.min is not None and setting.max is not None:
            assert setting.min <= setting.default <= setting.max, name
        if setting.choices is not None:
            assert setting.default in setting.choices, name


@pytest.mark.parametrize("value,problem", [
    (math.nan, "nan is not a finite number"), (math.inf, "inf is not a finite number"),
    (2.5, "2.5 is not a whole number"), (True, "True is not a number"), ("3", "'3' is not a number"),
    (0, "Value 0 smaller than min of 1"), (65, "Value 65 bigger than max of 64"),
])
def test_ints_must_be_whole_finite_numbers_in_range(value, problem):
    with pytest.raises(InvalidInput, match=f"^batch_size: {problem}"):
        GenerationRequest(prompt="x", batch_size=value).check()


def test_text_booleans_and_choices_are_of_their_kind():
    with pytest.raises(InvalidInput, match="^prompt: 5 is not text"):
        GenerationRequest(prompt=5).check()
    with pytest.raises(InvalidInput, match="^tiling: 'yes' is not true or false"):
        DecodeOptions(tiling="yes")
    with pytest.raises(InvalidInput, match="^scm_steps_policy: 'sometimes' is not one of the choices. Valid: dynamic, static"):
        CacheDiT(scm_steps_policy="sometimes")
    with pytest.raises(InvalidInput, match="^ignored_layers: 5 is not text"):
        FP8Quantize.from_user(mode="auto", ignored_layers=5, scale="per_tensor")
    request = GenerationRequest(prompt="x", steps=20.0)
    request.check()
    assert request.steps == 20 and type(request.steps) is int, "a whole float is taken as the int it is"
    assert type(TeaCache(rel_l1_thresh=1).rel_l1_thresh) is float


def test_ignored_inputs_are_the_ones_set_away_from_their_declared_default():
    default = settings_of(GenerationRequest)["guidance"].default
    assert GenerationRequest(prompt="x", guidance=default).given_family_inputs() == {}
    assert GenerationRequest(prompt="x", guidance=default + 1).given_family_inputs() == {"guidance": default + 1}
    assert GenerationRequest(prompt="x", ignored_images=3).given_family_inputs() == {"images": 3}


def test_a_setting_declares_one_of_four_kinds():
    with pytest.raises(TypeError):
        Setting(list, [], "a list of things")
