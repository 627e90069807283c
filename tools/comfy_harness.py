"""Start a real ComfyUI with this pack and drive it over HTTP and its websocket, as users' scripts do.

Completion and progress come from ComfyUI's websocket events (a reader thread), not from polling, so a
waiting client costs the server no CPU. Standard library plus websocket-client; shared by the demo, the
tests and the benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import websocket

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / ".build"
PACK_NAME = "comfyui-omni-accel"


class PromptRejected(RuntimeError):
    """ComfyUI refused the prompt at validation (HTTP 400); `body` holds its node_errors."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(json.dumps(body, indent=1)[:4000])


class ExecutionFailed(RuntimeError):
    def __init__(self, details: dict):
        self.details = details
        self.node_type = details.get("node_type")
        self.exception_type = details.get("exception_type")
        self.exception_message = details.get("exception_message", "")
        super().__init__(f"{self.node_type}: {self.exception_type}: {self.exception_message}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_dir(base: Path) -> Path:
    """A ComfyUI base directory with this pack installed (linked) and extra model folders registered."""
    for sub in ("custom_nodes", "models/diffusers", "input", "output", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    for image in (ROOT / "workflows" / "inputs").glob("*.png"):  # what the shipped workflows' LoadImage nodes read
        shutil.copy(image, base / "input" / image.name)
    return base


TEST_MODELS_CACHE = BUILD / "test-models"


def install_test_models(models: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    """The project's small models in a ComfyUI models folder, built once under .build/test-models: diffusers
    folders linked under diffusers/, except the files-* models, which come only as the single files ComfyUI users
    have (diffusion_models/, text_encoders/, vae/; tools/comfy_model_files.py). Returns the folders built."""
    from tools.comfy_model_files import build_test_files
    from tools.tiny_models import REFERENCE_MODEL, TEST_MODELS, build_models

    folders = build_models(TEST_MODELS_CACHE / "diffusers", names or TEST_MODELS + (REFERENCE_MODEL,))
    (models / "diffusers").mkdir(parents=True, exist_ok=True)
    singles = [folder for folder in folders if folder.name.startswith("files-")]
    for folder in folders:
        if folder not in singles:
            _link(models / "diffusers" / folder.name, folder)
    if singles:
        files = build_test_files(singles, TEST_MODELS_CACHE / "comfy-files")
        for kind in (path for path in files.iterdir() if path.is_dir()):
            for path in kind.iterdir():
                _link(models / kind.name / path.name, path)
    return folders


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=target.is_dir())


def link_native_files(models: Path, files: dict[str, Path], placeholder: bool = True) -> None:
    """Links the small native model files (tools/native_files.py) into a ComfyUI models folder, with (for tests) a
    placeholder for the text encoder the native workflows name (listed by CLIPLoader, never loaded)."""
    from tools.native_files import WAN_TEXT_ENCODER, placeholder_text_encoder

    for path in files.values():
        target = models / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(path)
    if placeholder:
        placeholder_text_encoder(models / "text_encoders" / WAN_TEXT_ENCODER)


def extra_model_paths_yaml(path: Path, models_dirs: list[Path]) -> Path:
    """ComfyUI's extra_model_paths format: one section per external models folder."""
    kinds = ("diffusers", "diffusion_models", "text_encoders", "vae", "checkpoints", "loras", "unet", "clip")
    lines = []
    for i, models in enumerate(models_dirs):
        lines.append(f"omni_extra_{i}:")
        lines.append(f"    base_path: {Path(models).resolve()}")
        lines += [f"    {kind}: {kind}" for kind in kinds]
    path.write_text("\n".join(lines) + "\n")
    return path


def comfyui_command(base: Path, port: int, extra_args: list[str] = ()) -> list[str]:
    return [
        str(BUILD / "venv" / "bin" / "python"),
        str(BUILD / "comfyui" / "main.py"),
        "--cpu",
        "--listen", "127.0.0.1",
        "--port", str(port),
        "--disable-auto-launch",
        "--base-directory", str(base),
        "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}",
        *extra_args,
    ]


def _die_with_parent() -> None:
    """In the server's process before exec: a test run killed outright (no fixture teardown) takes its server along."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ComfyServer:
    def __init__(self, base: Path, port: int | None = None, extra_args: list[str] = (), log_path: Path | None = None,
                 env: dict[str, str] | None = None):
        self.base = prepare_base_dir(Path(base))
        self.env = dict(env or {})
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.log_path = Path(log_path or self.base / "comfyui.log")
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self._ws: websocket.WebSocket | None = None
        self._events = threading.Condition()
        self._finished: set[str] = set()
        self._progress: dict[str, list[int]] = {}
        self._cached: dict[str, list[str]] = {}
        self.previews: list[bytes] = []  # preview images the server sent (binary websocket frames)
        self.texts: list[tuple[str, str]] = []  # (node id, text) shown on nodes (ComfyUI's progress text)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 180) -> "ComfyServer":
        log = self.log_path.open("ab")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.process = subprocess.Popen(
            comfyui_command(self.base, self.port, self.extra_args),
            cwd=str(BUILD / "comfyui"), stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
                continue
            self._ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}")
            threading.Thread(target=self._read_events, name="comfy-events", daemon=True).start()
            return self
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}")

    def _read_events(self) -> None:
        ws = self._ws
        while True:
            try:
                message = ws.recv()
            except Exception:
                break
            if not message:
                break  # closed
            if not isinstance(message, str):
                with self._events:
                    if struct.unpack(">I", message[:4])[0] == 3:  # text: 4-byte node id length, node id, text
                        length = struct.unpack(">I", message[4:8])[0]
                        self.texts.append((message[8:8 + length].decode(), message[8 + length:].decode()))
                    else:  # 4-byte event type, 4-byte image format, then the image
                        self.previews.append(message[8:])
                    self._events.notify_all()
                continue
            event = json.loads(message)
            data = event.get("data") or {}
            prompt_id = data.get("prompt_id")
            with self._events:
                if event["type"] == "progress" and prompt_id:
                    self._progress.setdefault(prompt_id, []).append(data["value"])
                elif event["type"] == "execution_cached" and prompt_id:
                    self._cached.setdefault(prompt_id, []).extend(data.get("nodes", []))
                elif event["type"] in ("execution_success", "execution_error", "execution_interrupted") or (
                    event["type"] == "executing" and data.get("node") is None and prompt_id
                ):
                    self._finished.add(prompt_id)
                self._events.notify_all()
        with self._events:
            self._events.notify_all()

    def progress(self, prompt_id: str) -> list[int]:
        """Progress values reported so far for a prompt (one per step of the running node)."""
        with self._events:
            return list(self._progress.get(prompt_id, []))

    def cached_nodes(self, prompt_id: str) -> list[str]:
        """Nodes whose outputs ComfyUI took from its cache instead of running them, for a finished prompt."""
        with self._events:
            return list(self._cached.get(prompt_id, []))

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- HTTP -------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url(path), timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str, timeout: float = 30):
        return json.loads(self.get(path, timeout))

    def post_json(self, path: str, body: dict, timeout: float = 30):
        request = urllib.request.Request(
            self.url(path), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    # --- prompts ----------------------------------------------------------------------------------
    def queue(self, prompt: dict) -> str:
        try:
            answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as exc:
            if exc.code == 400:
                raise PromptRejected(json.loads(exc.read())) from None
            raise
        return answer["prompt_id"]

    def _history_entry(self, prompt_id: str) -> dict | None:
        entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            return entry
        return None

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Blocks on websocket events until the prompt ends, then returns its /history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._events:
                self._events.wait_for(lambda: prompt_id in self._finished, timeout=5)
            # Also after a timeout: the history is the record, the events only say when to look.
            entry = self._history_entry(prompt_id)
            if entry is not None:
                return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}")
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue, wait, and raise ExecutionFailed if the run ended in an error."""
        entry = self.wait(self.queue(prompt), timeout)
        error = execution_error(entry)
        if error is not None:
            raise ExecutionFailed(error)
        return entry

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def interrupt_at_step(self, prompt_id: str, step: int, timeout: float = 120) -> dict:
        """Press Cancel once the prompt has reported `step` progress updates; returns its history entry."""
        with self._events:
            reached = self._events.wait_for(
                lambda: any(value >= step for value in self._progress.get(prompt_id, [])), timeout=timeout)
        if not reached:
            raise TimeoutError(f"prompt {prompt_id} did not reach step {step} in {timeout} s:\n{self.log_tail()}")
        self.interrupt()
        return self.wait(prompt_id, timeout=timeout)

    def free(self, unload_models: bool = True, free_memory: bool = False) -> None:
        """POST /free, then wait until the worker has acted on it.

        ComfyUI applies these flags between queue items, so after one more (trivial) prompt has finished,
        anything queued next is guaranteed to see the freed state.
        """
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})
        self.run({"sync": {"class_type": "PreviewAny", "inputs": {"source": uuid.uuid4().hex}}})

    def output_files(self, entry: dict, node_id: str, kind: str = "images") -> list[bytes]:
        files = []
        for item in entry["outputs"].get(node_id, {}).get(kind, []):
            query = urllib.parse.urlencode(
                {"filename": item["filename"], "subfolder": item.get("subfolder", ""), "type": item.get("type", "output")}
            )
            files.append(self.get(f"/view?{query}"))
        return files


def execution_error(entry: dict) -> dict | None:
    for kind, details in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return details
    return None


def node_text_output(entry: dict, node_id: str) -> list[str]:
    return entry["outputs"].get(node_id, {}).get("text", [])


if __name__ == "__main__":
    sys.exit("import this module; see tools/demo.py")
