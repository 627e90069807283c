"""The shipped workflows in ComfyUI's real editor (headless Chromium), as a user opens, edits and runs them.

Screenshots of every workflow after its run are kept under out/browser/ (test artifacts).
"""

from __future__ import annotations

import io
import json
import urllib.request

import pytest
from PIL import Image

from reference_model.shapes import read
from tests.helpers import API_WORKFLOWS, ROOT, WORKFLOWS, png_to_array
from tools.comfy_harness import PACK_NAME
from tools.editor import browser, editor
from tools.workflows import parallel_ranks, saver_id

UI_FILES = sorted(WORKFLOWS.glob("*.json"))
NAMES = [p.stem for p in UI_FILES]
# Needs several GPUs: loaded and checked in the editor, not queued (tests/e2e covers the parallel runtime).
SEVERAL_DEVICES = [name for name in NAMES if parallel_ranks(json.loads((API_WORKFLOWS / f"{name}.json").read_text())) > 1]
ARTIFACTS = ROOT / "out" / "browser"
NEW_PROMPT = "a blue square at the bottom left on a white background"
# What the reference model must draw for it (reference_model.shapes reads colours and places reliably).
NEW_SCENE = {"color": "blue", "position": "bottom left", "background": "white"}


@pytest.fixture(scope="module")
def page(comfy):
    with browser() as instance, editor(instance, comfy) as opened:
        yield opened
    assert not opened.console_errors, opened.console_errors


def _ui(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def _twin(name: str) -> dict:
    return json.loads((API_WORKFLOWS / f"{name}.json").read_text())


def _sampler(prompt: dict) -> tuple[str, dict]:
    return next((node_id, node["inputs"]) for node_id, node in prompt.items() if node["class_type"] == "OmniSampler")


def test_every_shipped_workflow_has_a_twin_and_a_thumbnail():
    assert len(NAMES) >= 14 and "qwen_image_multi_gpu" in SEVERAL_DEVICES
    assert sorted(p.stem for p in API_WORKFLOWS.glob("*.json")) == NAMES
    for name in NAMES:
        with Image.open(WORKFLOWS / f"{name}.jpg") as thumb:
            assert thumb.format == "JPEG" and min(thumb.size) >= 128
            assert len(set(thumb.convert("RGB").getdata())) > 8, f"{name}: the thumbnail is a picture, not a blank"


def test_the_template_browser_lists_the_pack_and_opens_its_workflows(page, comfy):
    for name in NAMES:  # what the browser fetches for each tile
        with urllib.request.urlopen(comfy.url(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")) as answer:
            assert Image.open(io.BytesIO(answer.read())).format == "JPEG"
    dialog = page.open_templates(PACK_NAME)
    listed = dialog.inner_text()
    assert f"Showing {len(NAMES)} of {len(NAMES)} templates" in listed, "UI workflows only: API twins live in a subfolder"
    assert all(name in listed.split("\n") for name in NAMES)
    shown = page.page.evaluate(
        "() => Array.from(document.querySelectorAll('.p-dialog img')).filter(i => i.complete && i.naturalWidth > 0).length")
    assert shown >= 4, "the tiles show the thumbnails"
    page.screenshot(ARTIFACTS / "template_browser.png", fit=False)
    dialog.get_by_text("qwen_image_teacache", exact=True).click()
    page.page.wait_for_function("() => !document.querySelector('.p-dialog')")
    page.settle()
    assert page.serialize()["nodes"] == _ui("qwen_image_teacache")["nodes"]
    assert page.problems() == []


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_cleanly_and_its_twin_is_the_editors_conversion(page, name):
    workflow = _ui(name)
    page.load_ui(workflow, name)
    assert page.problems() == []
    assert page.serialize() == workflow, "the file is saved as the editor itself writes it"
    converted, twin = page.to_prompt(), _twin(name)
    assert converted.keys() == twin.keys()
    for node_id, node in twin.items():
        assert converted[node_id]["class_type"] == node["class_type"]
        for input_name, value in node["inputs"].items():
            assert converted[node_id]["inputs"][input_name] == value, (name, node_id, input_name)
        assert converted[node_id] == node, (name, node_id)
    seed_controls = [v for n in workflow["nodes"] if n["type"] == "OmniSampler" for v in n["widgets_values"][3:4]]
    assert seed_controls == ["fixed"], "a shipped workflow reproduces its picture: the seed is not randomized"


@pytest.mark.parametrize("name", [n for n in NAMES if n not in SEVERAL_DEVICES])
def test_workflow_runs_from_the_editor_after_a_change_in_the_ui(page, comfy, name):
    workflow, twin = _ui(name), _twin(name)
    sampler_id, sampler = _sampler(twin)
    page.load_ui(workflow, name)
    page.type_into(int(sampler_id), "prompt", NEW_PROMPT)
    assert page.widget_value(int(sampler_id), "prompt") == NEW_PROMPT

    prompt_id = page.click_run()
    entry = comfy.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    queued = entry["prompt"][2]
    expected = json.loads(json.dumps(twin))
    expected[sampler_id]["inputs"]["prompt"] = NEW_PROMPT
    assert queued == expected, "the editor queued the shipped prompt with exactly the one change made in the UI"

    [data] = comfy.output_files(entry, saver_id(twin))
    with Image.open(io.BytesIO(data)) as saved:
        assert saved.size == (sampler["width"], sampler["height"])
        if twin[saver_id(twin)]["class_type"] == "SaveAnimatedWEBP":
            assert saved.n_frames == sampler["num_frames"], "every video frame is saved"
    if twin["1"]["inputs"]["model"] == "omni-shapes-qwen-image":  # the change made in the editor reached the model
        drawn = read(png_to_array(data))
        assert {k: drawn[k] for k in NEW_SCENE} == NEW_SCENE, drawn

    shown = page.wait_for_image(int(saver_id(twin)))
    assert "/view?" in shown["src"] and (shown["width"], shown["height"]) == (sampler["width"], sampler["height"])
    page.screenshot(ARTIFACTS / f"{name}.png")
    sampler_node = next(n for n in page.serialize()["nodes"] if n["type"] == "OmniSampler")
    original = next(n for n in workflow["nodes"] if n["type"] == "OmniSampler")
    assert len(sampler_node["widgets_values"]) == len(original["widgets_values"]), \
        "the run summary shown on the Sampler is not saved into the workflow"
