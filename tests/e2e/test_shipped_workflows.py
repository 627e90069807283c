"""Shipped workflows: each UI-format file is the twin of its API file, and each API file runs."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

import numpy as np

from tests.helpers import WORKFLOWS, png_to_array
from tools.workflow_format import ui_to_api

API_FILES = sorted(WORKFLOWS.glob("*_api.json"))


def _strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


@pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.name)
def test_ui_workflow_is_the_twin_of_the_api_one(comfy, api_path):
    ui_path = api_path.with_name(api_path.name.replace("_api.json", ".json"))
    ui = json.loads(ui_path.read_text())
    assert ui["version"] == 0.4 and ui["links"] and ui["nodes"]
    object_info = comfy.get_json("/object_info")
    assert ui_to_api(ui, object_info) == _strip_meta(json.loads(api_path.read_text()))


@pytest.mark.parametrize("api_path", API_FILES, ids=lambda p: p.name)
def test_api_workflow_runs_as_shipped(comfy, api_path):
    prompt = json.loads(api_path.read_text())
    entry = comfy.run(prompt)
    sampler = next(node["inputs"] for node in prompt.values() if node["class_type"] == "OmniSampler")
    saves = {node_id: node for node_id, node in prompt.items() if node["class_type"] in ("SaveImage", "SaveAnimatedWEBP")}
    assert saves
    for node_id, node in saves.items():
        [data] = comfy.output_files(entry, node_id)
        image = Image.open(io.BytesIO(data))
        if sampler["width"] and sampler["height"]:
            assert image.size == (sampler["width"], sampler["height"])
        if node["class_type"] == "SaveAnimatedWEBP":
            assert image.n_frames == sampler["num_frames"], "every video frame is saved"


# Inputs appended after the first release: prompts saved before them must run unchanged.
ADDED_LATER = {"OmniLoader": ("compile",)}


def test_prompts_saved_before_later_inputs_still_run(comfy):
    prompt = json.loads((WORKFLOWS / "qwen_image_api.json").read_text())
    prompt["2"]["inputs"]["steps"] = 3
    current = png_to_array(comfy.output_files(comfy.run(prompt), "4")[0])
    for node in prompt.values():
        for name in ADDED_LATER.get(node["class_type"], ()):
            del node["inputs"][name]
    prompt["4"]["inputs"]["filename_prefix"] = "older_prompt"  # re-runs the saver, the rest may come from cache
    np.testing.assert_array_equal(png_to_array(comfy.output_files(comfy.run(prompt), "4")[0]), current)
