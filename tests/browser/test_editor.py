"""The shipped workflows in ComfyUI's real editor (headless Chromium), as a user opens, edits and runs them.

Screenshots of every workflow after its run are kept under out/browser/ (test artifacts).
"""

from __future__ import annotations

import io
import json
import urllib.request

import av
import pytest
from PIL import Image

from reference_model.shapes import read
from tests.helpers import API_WORKFLOWS, ROOT, WORKFLOWS, png_to_array
from tools.comfy_harness import PACK_NAME
from tools.editor import browser, editor
from tools.workflows import (
    TEST_TEXT_ENCODER, is_native, parallel_ranks, saver_id, uses_comfy_text_encoders, with_test_text_encoder,
)

UI_FILES = sorted(WORKFLOWS.glob("*.json"))
NAMES = [p.stem for p in UI_FILES]
# UNETLoader -> cache node -> KSampler: ComfyUI's own nodes with the pack's caches between them
NATIVE = [name for name in NAMES if is_native(json.loads((API_WORKFLOWS / f"{name}.json").read_text()))]
FIXTURES = ROOT / "tests" / "fixtures"
# Needs several GPUs: loaded and checked in the editor, not queued (tests/e2e covers the parallel runtime).
SEVERAL_DEVICES = [name for name in NAMES if parallel_ranks(json.loads((API_WORKFLOWS / f"{name}.json").read_text())) > 1]
# ComfyUI's CLIPLoader around the pack: run through the API with the tests' loader (tests/e2e/test_shipped_workflows.py)
COMFY_TEXT_ENCODERS = [name for name in NAMES if uses_comfy_text_encoders(json.loads((API_WORKFLOWS / f"{name}.json").read_text()))]
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
    try:
        # UI workflows only: API twins live in a subfolder
        dialog.get_by_text(f"Showing {len(NAMES)} of {len(NAMES)} templates").wait_for(timeout=30_000)
        seen = set(dialog.inner_text().split("\n"))
        for _ in range(20):  # the grid draws the tiles in view: scroll it to the end to see the last ones
            if all(name in seen for name in NAMES):
                break
            page.page.evaluate("""() => document.querySelectorAll('.p-dialog *').forEach(
                (e) => { if (e.scrollHeight > e.clientHeight + 4) e.scrollTop = e.scrollHeight; })""")
            page.page.wait_for_timeout(500)
            seen |= set(dialog.inner_text().split("\n"))
        assert all(name in seen for name in NAMES), [name for name in NAMES if name not in seen]
        page.page.evaluate("() => document.querySelectorAll('.p-dialog *').forEach((e) => { e.scrollTop = 0; })")
        page.page.wait_for_function(  # the tiles show the thumbnails (they load lazily)
            "() => Array.from(document.querySelectorAll('.p-dialog img'))"
            ".filter(i => i.complete && i.naturalWidth > 0).length >= 4", timeout=30_000)
        page.screenshot(ARTIFACTS / "template_browser.png", fit=False)
        tile = dialog.get_by_text("qwen_image_teacache", exact=True)
        tile.scroll_into_view_if_needed()
        tile.click()
        page.page.wait_for_function("() => !document.querySelector('.p-dialog')")
    finally:  # an open dialog would stand in front of every later test's page
        if page.page.locator(".p-dialog").count():
            page.page.keyboard.press("Escape")
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
    controls = ("fixed", "increment", "decrement", "randomize")
    seed_controls = [v for n in workflow["nodes"] for v in n.get("widgets_values") or [] if v in controls]
    assert seed_controls and set(seed_controls) == {"fixed"}, "a shipped workflow reproduces its picture"


def test_a_workflow_saved_before_the_cache_nodes_took_a_model_still_loads_and_converts_the_same(page):
    """The cache nodes' `pipe` became OMNI_PIPE-or-MODEL; a UI file saved with the old socket types loads without
    problems and the editor converts it to the API prompt it converted to before (with inputs added since at their
    defaults)."""
    old = json.loads((FIXTURES / "qwen_image_teacache_saved_before_model_input.json").read_text())
    page.load_ui(old, "old_teacache")
    assert page.problems() == []
    assert page.to_prompt() == json.loads((FIXTURES / "qwen_image_teacache_saved_before_model_input.api.json").read_text())
    node = next(n for n in page.serialize()["nodes"] if n["type"] == "OmniTeaCache")
    assert node["outputs"][0]["type"] == "OMNI_PIPE", "the output follows the OMNI_PIPE connected to it"


FAMILY_INPUTS = {"num_frames", "guidance", "cfg_2", "boundary_ratio", "frame_rate", "audio_cfg", "stg_scale",
                 "modality_scale"}
LTX2_INPUTS = {"num_frames", "frame_rate", "audio_cfg", "stg_scale", "modality_scale"}


def _shown_after_family(page, node_id: int, family: str) -> set[str]:
    """The Sampler's visible widgets once the editor has learnt its model's family."""
    page.page.wait_for_function("([id, family]) => app.graph.getNodeById(id).omniFamily === family", arg=[node_id, family])
    return set(page.page.evaluate("(id) => app.graph.getNodeById(id).widgets.filter(w => !w.hidden).map(w => w.name)",
                                  node_id))


def test_the_sampler_shows_the_inputs_its_models_family_uses(page):
    """A Qwen-Image stack's Sampler shows no video or Flux inputs, a Wan 2.2 stack's its own, and choosing another
    model in the Loader changes them; hidden inputs keep their values and convert as before."""
    page.load_ui(_ui("qwen_image_teacache"), "qwen_image_teacache")  # Loader -> TeaCache -> Sampler
    sampler = int(_sampler(_twin("qwen_image_teacache"))[0])
    shown = _shown_after_family(page, sampler, "qwen-image")
    assert not shown & FAMILY_INPUTS and {"prompt", "seed", "cfg", "flow_shift"} <= shown
    assert page.to_prompt() == _twin("qwen_image_teacache")
    page.load_ui(_ui("wan22"), "wan22")
    sampler = int(_sampler(_twin("wan22"))[0])
    assert _shown_after_family(page, sampler, "wan") & FAMILY_INPUTS == {"num_frames", "cfg_2", "boundary_ratio"}
    page.page.evaluate("""() => {
        const loader = app.graph._nodes.find((n) => n.type === "OmniLoader");
        const model = loader.widgets.find((w) => w.name === "model");
        model.value = "tiny-flux";
        model.callback(model.value);
    }""")
    assert _shown_after_family(page, sampler, "flux") & FAMILY_INPUTS == {"guidance"}
    converted = page.to_prompt()[str(sampler)]["inputs"]
    assert converted["num_frames"] == _twin("wan22")[str(sampler)]["inputs"]["num_frames"], "hidden, still sent"
    page.load_ui(_ui("ltx2"), "ltx2")  # recipe F: LTX-2 shows its frames, frame rate and guidance scales
    sampler = int(_sampler(_twin("ltx2"))[0])
    assert _shown_after_family(page, sampler, "ltx2") & FAMILY_INPUTS == LTX2_INPUTS
    assert page.to_prompt() == _twin("ltx2")


def _output_type(page, node_id: int) -> str:
    return page.page.evaluate("(id) => app.graph.getNodeById(id).outputs[0].type", node_id)


def test_the_cache_output_follows_what_is_connected_to_it(page):
    """MODEL in: the output is a MODEL (it links to KSampler only); unconnected: either; an OMNI_PIPE in: an
    OMNI_PIPE, and the link to KSampler, which cannot take one, is removed."""
    page.load_ui(_ui("wan21_native_teacache"), "wan21_native_teacache")
    assert _output_type(page, 6) == "MODEL"
    page.page.evaluate("() => app.graph.getNodeById(6).disconnectInput(0)")
    assert _output_type(page, 6) == "OMNI_PIPE,MODEL"
    assert page.page.evaluate("() => app.graph.getNodeById(7).inputs[0].link") is not None
    page.page.evaluate("""() => {
        const loader = LiteGraph.createNode("OmniLoader");
        app.graph.add(loader);
        loader.connect(0, app.graph.getNodeById(6), 0);
    }""")
    assert _output_type(page, 6) == "OMNI_PIPE"
    assert page.page.evaluate("() => app.graph.getNodeById(7).inputs[0].link") is None, "KSampler takes no OMNI_PIPE"


@pytest.mark.parametrize("name", NATIVE)
def test_native_workflow_runs_from_the_editor(page, comfy, name):
    """A native workflow as shipped loads cleanly; with its text encoding swapped for the tests' encoder in the
    editor (ComfyUI's UMT5-XXL cannot be made small) and a new prompt typed in, it runs from the Run button, saves
    every frame, and each cache node shows its run's summary."""
    workflow, twin = _ui(name), _twin(name)
    page.load_ui(workflow, name)
    assert page.problems() == []
    assert sorted(page.replace_text_encoders(TEST_TEXT_ENCODER)) == sorted(
        int(i) for i, n in twin.items() if n["class_type"] == "CLIPTextEncode")
    positive = next(int(i) for i, n in twin.items() if n["class_type"] == "CLIPTextEncode"
                    and n["_meta"]["title"].startswith("Positive"))
    page.type_into(positive, "text", NEW_PROMPT)

    prompt_id = page.click_run()
    entry = comfy.wait(prompt_id)
    assert entry["status"]["status_str"] == "success", entry["status"]
    expected = with_test_text_encoder(twin)
    expected[str(positive)]["inputs"]["text"] = NEW_PROMPT
    queued = entry["prompt"][2]
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in queued.items()} == {
        k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in expected.items()}
    [data] = comfy.output_files(entry, saver_id(twin))
    latent = next(n["inputs"] for n in twin.values() if n["class_type"] == "EmptyHunyuanLatentVideo")
    with Image.open(io.BytesIO(data)) as saved:
        assert saved.size == (latent["width"], latent["height"]) and saved.n_frames == latent["length"]
    for node_id, node in twin.items():
        if node["class_type"] in ("OmniTeaCache", "OmniCacheDiT"):
            page.page.wait_for_function(
                "([id, start]) => (app.graph.getNodeById(id).widgets ?? []).some(w => typeof w.value === 'string'"
                " && w.value.startsWith(start))", arg=[int(node_id), f"{node['_meta']['title'].split(' (')[0]} on node {node_id}"],
                timeout=30_000)
    page.screenshot(ARTIFACTS / f"{name}.png")

@pytest.mark.parametrize("name", [n for n in NAMES if n not in SEVERAL_DEVICES + NATIVE + COMFY_TEXT_ENCODERS])
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
    if twin[saver_id(twin)]["class_type"] == "SaveVideo":  # an mp4 with the video's frames and its sound
        with av.open(io.BytesIO(data)) as saved:
            frames = list(saved.decode(video=0))
            assert (frames[0].width, frames[0].height) == (sampler["width"], sampler["height"])
            assert len(frames) == sampler["num_frames"] and len(saved.streams.audio) == 1
        shown = page.wait_for_output(int(saver_id(twin)))
        assert shown["filename"] == entry["outputs"][saver_id(twin)]["images"][0]["filename"]
    else:
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
