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

from tools.tiny_models import REFERENCE_MODEL, TEST_MODELS, build_models  # noqa: E402
from tools.comfy_harness import BUILD, ROOT, ComfyServer, node_text_output  # noqa: E402

WORKFLOW = ROOT / "example_workflows" / "api" / "qwen_image.json"
OUT = ROOT / "out" / "demo"
PORT = 8188


def main() -> int:
    base = BUILD / "base"
    prompt = json.loads(WORKFLOW.read_text())
    model = prompt["1"]["inputs"]["model"]
    print(f"[demo] building the {model} model into {base / 'models' / 'diffusers'} ...", flush=True)
    build_models(base / "models" / "diffusers", [model])
    OUT.mkdir(parents=True, exist_ok=True)
    with ComfyServer(base, log_path=OUT / "comfyui.log") as server:
        print(f"[demo] ComfyUI 0.3.75 with Omni Accel on http://127.0.0.1:{server.port}; queueing {WORKFLOW.name}", flush=True)
        start = time.perf_counter()
        entry = server.run(prompt)
        seconds = time.perf_counter() - start
        images = server.output_files(entry, "4")
        report = node_text_output(entry, "5")
    written = []
    for i, data in enumerate(images):
        path = OUT / f"qwen_image_{i:02d}.png"
        path.write_bytes(data)
        written.append(path)
    report_path = OUT / "report.json"
    report_path.write_text(report[0] if report else "{}")
    shutil.copy(WORKFLOW, OUT / WORKFLOW.name)
    print(f"[demo] done in {seconds:.1f} s")
    for path in written:
        print(f"[demo] image:  {path}")
    print(f"[demo] report: {report_path}")
    print(f"[demo] server log: {OUT / 'comfyui.log'}")
    if not written:
        return 1
    if sys.stdin.isatty():  # someone is watching: leave the editor up for them, with every shipped workflow's model
        build_models(base / "models" / "diffusers", TEST_MODELS + (REFERENCE_MODEL,))
        with ComfyServer(base, port=PORT, extra_args=["--preview-method", "auto"], log_path=OUT / "comfyui.log"):
            print(f"[demo] open the editor with the pack: http://127.0.0.1:{PORT}  (workflows: Templates ->"
                  f" Extensions -> comfyui-omni-accel; Ctrl-C stops)", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    else:
        print(f"[demo] to open the editor with the pack: make serve, then http://127.0.0.1:{PORT}"
              " (workflows: Templates -> Extensions -> comfyui-omni-accel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
