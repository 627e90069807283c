"""make demo: start a real ComfyUI with the pack, run the shipped Qwen-Image workflow, keep the outputs.

Leaves the image(s) and the run report under out/demo/, prints where they are, and ends with the address
of the editor with the pack and its workflows (kept up until Ctrl-C when run from a terminal).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.tiny_models import REFERENCE_MODEL, TEST_MODELS  # noqa: E402
from tools.comfy_harness import BUILD, ROOT, ComfyServer, install_test_models, node_text_output  # noqa: E402

WORKFLOW = ROOT / "workflows" / "api" / "qwen_image.json"
OUT = ROOT / "out" / "demo"
PORT = 8188


def main() -> int:
    base = BUILD / "base"
    prompt = json.loads(WORKFLOW.read_text())
    model = prompt["1"]["inputs"]["model"]
    # Someone at a terminal gets the editor left up afterwards, with every shipped workflow's model.
    interactive = sys.stdin.isatty()
    models = TEST_MODELS + (REFERENCE_MODEL,) if interactive else (model,)
    print(f"[demo] building {', '.join(models)} into {base / 'models'} ...", flush=True)
    install_test_models(base / "models", tuple(models))
    OUT.mkdir(parents=True, exist_ok=True)
    server_options = dict(port=PORT, extra_args=["--preview-method", "auto"]) if interactive else {}
    with ComfyServer(base, log_path=OUT / "comfyui.log", **server_options) as server:
        print(f"[demo] ComfyUI 0.3.75 with Omni Accel on http://127.0.0.1:{server.port}; queueing {WORKFLOW.name}", flush=True)
        start = time.perf_counter()
        entry = server.run(prompt)
        seconds = time.perf_counter() - start
        written = write_outputs(server.output_files(entry, "4"), node_text_output(entry, "5"))
        print(f"[demo] done in {seconds:.1f} s")
        for path in written:
            print(f"[demo] image:  {path}")
        print(f"[demo] report: {OUT / 'report.json'}")
        print(f"[demo] server log: {OUT / 'comfyui.log'}")
        if not written:
            return 1
        workflows = "workflows: Templates -> Extensions -> comfyui-omni-accel"
        if not interactive:
            print(f"[demo] to open the editor with the pack: make serve, then http://127.0.0.1:{PORT} ({workflows})")
            return 0
        print(f"[demo] open the editor with the pack: http://127.0.0.1:{server.port}  ({workflows}; Ctrl-C stops)",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def write_outputs(images: list[bytes], report: list[str]) -> list[Path]:
    written = []
    for i, data in enumerate(images):
        path = OUT / f"qwen_image_{i:02d}.png"
        path.write_bytes(data)
        written.append(path)
    (OUT / "report.json").write_text(report[0] if report else "{}")
    shutil.copy(WORKFLOW, OUT / WORKFLOW.name)
    return written


if __name__ == "__main__":
    sys.exit(main())
