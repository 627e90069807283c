"""Rebuilds the shipped workflows with ComfyUI's own editor, and their thumbnails by running them.

The API files in workflows/api/ are the recipes as authored. For each one, the real editor (headless
Chromium on a real server) loads it, and what it writes back is shipped:
  - workflows/<name>.json      the UI workflow, as the editor serializes it (app.graph.serialize),
  - workflows/api/<name>.json  the API twin, as the editor converts the UI file (app.graphToPrompt),
  - workflows/<name>.jpg       the thumbnail ComfyUI's template browser shows: the workflow's own
                                       output on the small models, produced by running it (native
                                       workflows with the tests' text encoder: ComfyUI's UMT5-XXL has
                                       a fixed size),
  - docs/images/                       the README's pictures (the stack in the editor, outputs side by side).

  .build/venv/bin/python tools/workflows.py [name ...]
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.comfy_harness import ROOT, ComfyServer, install_test_models, link_native_files  # noqa: E402
from tools.editor import browser, editor  # noqa: E402
from tools.native_files import build_native_files  # noqa: E402

WORKFLOWS = ROOT / "workflows"
API = WORKFLOWS / "api"
IMAGES = ROOT / "docs" / "images"
THUMBNAIL_SIZE = 256
SAVERS = ("SaveImage", "SaveAnimatedWEBP", "SaveVideo")
# The README's side-by-side picture: the plain workflow, then accelerated ones with the same seed and prompt.
SIDE_BY_SIDE = ("qwen_image", "qwen_image_teacache", "qwen_image_cachedit", "qwen_image_fp8_cachedit",
                "qwen_image_dbcache_taylorseer")
EDITOR_PICTURE = "qwen_image_fp8_cachedit"


# ComfyUI's Wan text encoder (UMT5-XXL) has a fixed size: to run a native workflow on the small models, its
# text encoding goes through the tests' encoder node (the tiny Wan's own text encoder, ComfyUI's CONDITIONING).
TEST_TEXT_ENCODER = "OmniTestTextEncode"


def with_test_text_encoder(prompt: dict) -> dict:
    """The prompt with every CLIPTextEncode replaced by the test encoder (same node id, same text) and the
    CLIPLoaders feeding them removed; other prompts are returned unchanged."""
    prompt = json.loads(json.dumps(prompt))
    loaders = set()
    for node in prompt.values():
        if node["class_type"] == "CLIPTextEncode":
            loaders.add(node["inputs"]["clip"][0])
            node["class_type"] = TEST_TEXT_ENCODER
            node["inputs"] = {"text": node["inputs"]["text"]}
    for node_id in loaders:
        del prompt[node_id]
    return prompt


# ComfyUI's CLIPLoader builds its text encoders at the released size whatever the file holds: the small
# text-encoder files of the single-file test models load through the tests' loader (same file, ComfyUI's own
# classes at the file's size), keyed by the CLIPLoader type it stands in for.
TEST_CLIP_LOADER = "OmniTestCLIPLoader"
_CLIP_FAMILIES = {"qwen_image": "qwen-image", "lumina2": "z-image", "flux": "flux"}


def with_test_clip_loaders(prompt: dict) -> dict:
    """The prompt with each CLIPLoader / DualCLIPLoader replaced by the tests' loader on the same files (same
    node id); other prompts are returned unchanged."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CLIPLoader":
            node["class_type"] = TEST_CLIP_LOADER
            node["inputs"] = {"clip_name": inputs["clip_name"], "family": _CLIP_FAMILIES[inputs["type"]]}
        elif node["class_type"] == "DualCLIPLoader":
            node["class_type"] = TEST_CLIP_LOADER
            node["inputs"] = {"clip_name": inputs["clip_name1"], "clip_name2": inputs["clip_name2"],
                              "family": _CLIP_FAMILIES[inputs["type"]]}
    return prompt


def uses_comfy_text_encoders(prompt: dict) -> bool:
    """ComfyUI's own text-encoder loaders around the pack's Loader and Sampler."""
    return any(node["class_type"] in ("CLIPLoader", "DualCLIPLoader") for node in prompt.values()) and not is_native(prompt)


def is_native(prompt: dict) -> bool:
    """A native workflow: ComfyUI's own loaders and samplers, the pack's nodes only in between."""
    return any(node["class_type"] in ("KSampler", "KSamplerAdvanced") for node in prompt.values())


def parallel_ranks(prompt: dict) -> int:
    """Ranks a workflow's Parallel Config asks for (1 without one)."""
    from dataclasses import fields

    from omni_core.parallel.layout import ParallelConfig

    ranks = 1
    for node in prompt.values():
        if node["class_type"] == "OmniParallelConfig":
            names = {f.name for f in fields(ParallelConfig)}
            ranks = ParallelConfig(**{k: v for k, v in node["inputs"].items() if k in names}).world_size
    return ranks


def saver_id(prompt: dict) -> str:
    return next(node_id for node_id, node in prompt.items() if node["class_type"] in SAVERS)


def first_frame(data: bytes) -> Image.Image:
    if data[4:8] == b"ftyp":  # an mp4 (SaveVideo)
        import av

        with av.open(io.BytesIO(data)) as container:
            return next(container.decode(video=0)).to_image().convert("RGB")
    image = Image.open(io.BytesIO(data))
    image.seek(0)
    return image.convert("RGB")


def thumbnail(image: Image.Image) -> Image.Image:
    scale = max(1, THUMBNAIL_SIZE // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def editor_roundtrip(page, prompt: dict, name: str) -> tuple[dict, dict]:
    """(UI workflow, API twin) as the editor makes them from an API prompt; the UI file reloads to itself."""
    page.load_api(prompt, name)
    page.fix_seeds()
    workflow = page.serialize()
    for _ in range(3):  # a node takes its drawn size on the first frame after a load
        page.load_ui(workflow, name)
        again = page.serialize()
        if again == workflow:
            break
        workflow = again
    else:
        raise RuntimeError(f"{name}: the editor does not serialize this workflow to a fixed point")
    if problems := page.problems():
        raise RuntimeError(f"{name}: the editor reports problems:\n" + "\n".join(problems))
    return workflow, page.to_prompt()


def side_by_side(outputs: dict[str, Image.Image]) -> Image.Image:
    from bench.harness import psnr, ssim

    baseline = np.asarray(outputs[SIDE_BY_SIDE[0]])
    tiles = []
    for name in SIDE_BY_SIDE:
        image = thumbnail(outputs[name])
        label = name.removeprefix("qwen_image_") if name != SIDE_BY_SIDE[0] else "baseline"
        if name != SIDE_BY_SIDE[0]:
            accelerated = np.asarray(outputs[name])
            label += f"  {psnr(accelerated, baseline):.1f} dB, SSIM {ssim(accelerated, baseline):.3f}"
            print(f"{name} vs {SIDE_BY_SIDE[0]}: {label}")
        tile = Image.new("RGB", (image.width, image.height + 24), "white")
        tile.paste(image, (0, 24))
        ImageDraw.Draw(tile).text((4, 6), label, fill="black")
        tiles.append(tile)
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + 8
    return strip


def main(names: list[str]) -> int:
    sources = sorted(API.glob("*.json"))
    if names:
        sources = [p for p in sources if p.stem in names]
    prompts = {p.stem: json.loads(p.read_text()) for p in sources}
    # The multi-GPU recipe runs here on CPU ranks (gloo) to make its thumbnail.
    os.environ["OMNI_ACCEL_CPU_RANKS"] = str(max(parallel_ranks(p) for p in prompts.values()))
    native = build_native_files(ROOT / ".build" / "test-models" / "native")
    outputs: dict[str, Image.Image] = {}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        install_test_models(base / "models")
        link_native_files(base / "models", native)
        (base / "custom_nodes").mkdir(parents=True, exist_ok=True)  # the test encoder the native thumbnails use
        (base / "custom_nodes" / "omni_test_nodes").symlink_to(ROOT / "tests" / "comfy_test_nodes", target_is_directory=True)
        with ComfyServer(base) as server, browser() as instance, editor(instance, server) as page:
            for name, prompt in prompts.items():
                workflow, twin = editor_roundtrip(page, prompt, name)
                (WORKFLOWS / f"{name}.json").write_text(json.dumps(workflow, indent=2) + "\n")
                (API / f"{name}.json").write_text(json.dumps(twin, indent=2) + "\n")
                if name == EDITOR_PICTURE:
                    page.screenshot(IMAGES / "editor_stack.png")
                entry = server.run(with_test_text_encoder(twin) if is_native(twin) else with_test_clip_loaders(twin))
                [data] = server.output_files(entry, saver_id(twin))
                outputs[name] = first_frame(data)
                thumbnail(outputs[name]).save(WORKFLOWS / f"{name}.jpg", quality=92)
                print(f"{name}: UI file, API twin and thumbnail written", flush=True)
    if all(name in outputs for name in SIDE_BY_SIDE):
        side_by_side(outputs).save(IMAGES / "baseline_vs_accelerated.png")
        print(f"{IMAGES / 'baseline_vs_accelerated.png'} written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
