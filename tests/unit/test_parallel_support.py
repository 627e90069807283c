"""The README's support table is the code's: the same functions decide the table's cells and Parallel Config's
refusals."""

from __future__ import annotations

import pytest

from omni_core import IncompatibleStack
from omni_core.families import FAMILIES
from omni_core.parallel.layout import ParallelConfig
from omni_core.parallel.support import METHODS, NO_EXPERTS, method_problems, support_table
from tests.unit.test_parallel import cpu_pipe
from tools.parallel_support import README, render, section_in


def test_readme_table_is_generated_from_the_code():
    assert section_in(README.read_text()) == render(), "run: .build/venv/bin/python tools/parallel_support.py"
    table = support_table().splitlines()
    assert len([line for line in table if line.startswith("| ") and "Family" not in line]) == len(FAMILIES)
    assert f"({1}) {NO_EXPERTS}." in table or any(NO_EXPERTS in line for line in table)


def test_every_family_takes_every_method_but_expert_parallel():
    for family in FAMILIES:
        problems = method_problems(family)
        assert list(problems) == list(METHODS)
        assert problems["Expert"] == NO_EXPERTS
        refused = {m for m, p in problems.items() if p}
        if family.name.startswith("flux2"):  # no tensor-parallel plan or patch-parallel VAE for Flux.2 yet
            assert refused == {"Expert", "Tensor parallel", "VAE patch"} | ({"CFG"} if family.name == "flux2" else set())
        elif family.name == "ltx2":  # nor for LTX-2, whose three guidance passes CFG parallel does not split
            assert refused == {"Expert", "Tensor parallel", "VAE patch", "CFG"}
        else:
            assert refused == {"Expert"}, family.name


def test_flux2_is_refused_where_a_method_has_no_plan(model_dirs):
    from tests.helpers import tiny_pipe

    dev, klein = tiny_pipe(model_dirs, "tiny-flux2"), tiny_pipe(model_dirs, "tiny-flux2-klein")
    with pytest.raises(IncompatibleStack, match=r"^Parallel Config: cfg_parallel_size: no negative-prompt branch"):
        dev.with_accelerator(ParallelConfig(cfg_parallel_size=2))
    with pytest.raises(IncompatibleStack, match=r"tensor_parallel_size: no tensor-parallel plan for Flux2Transformer2DModel"):
        klein.with_accelerator(ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(IncompatibleStack, match=r"vae_patch_parallel_size: AutoencoderKLFlux2 has no patch-parallel"):
        klein.with_accelerator(ParallelConfig(vae_patch_parallel_size=2))
    for layout in (ParallelConfig(ulysses_degree=2), ParallelConfig(ring_degree=2),
                   ParallelConfig(use_hsdp=True, hsdp_shard_size=2)):
        assert dev.with_accelerator(layout).recipe == (layout,)
    assert klein.with_accelerator(ParallelConfig(cfg_parallel_size=2)).recipe


def test_a_family_without_a_plan_is_refused_with_the_tables_reason(model_dirs, monkeypatch):
    pipe = cpu_pipe(model_dirs, "quant-qwen-image")
    family = pipe.spec.model_family
    monkeypatch.setattr(type(family), "vae_class", "AutoencoderKLNew")
    config = type(pipe.spec.source).component_config
    classes = {"transformer": "NewTransformer2DModel", "vae": "AutoencoderKLNew"}
    monkeypatch.setattr(type(pipe.spec.source), "component_config",
                        lambda self, name: {**config(self, name), "_class_name": classes.get(name, "")})
    problems = method_problems(family)
    assert problems["VAE patch"].startswith("AutoencoderKLNew has no patch-parallel decode")
    for settings, problem in ((dict(tensor_parallel_size=2), "no tensor-parallel plan for NewTransformer2DModel"),
                              (dict(use_hsdp=True, hsdp_shard_size=2), "no block lists known to shard for NewTransformer2DModel"),
                              (dict(vae_patch_parallel_size=2), "AutoencoderKLNew has no patch-parallel decode")):
        with pytest.raises(IncompatibleStack, match=f"Parallel Config: .*: {problem}"):
            pipe.with_accelerator(ParallelConfig(**settings))
