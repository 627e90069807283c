"""Drive ComfyUI's own editor (the frontend the server ships) in headless Chromium, as a user would.

Used by the browser tests and by tools/workflows.py, which has the editor itself write the shipped UI
files and their API twins. Debian's Chromium is used (FACTS.md §4): Playwright's own browser download
does not work here.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

CHROMIUM = os.environ.get("OMNI_ACCEL_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1920, "height": 900}

# Settings a returning user has: no first-visit template dialog, no tour banners.
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True}
# Node text stays readable in screenshots of a whole stack (no low-detail rendering when zoomed out).
SCREENSHOT_SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 0}

# Everything a check needs to know about the loaded graph, computed in the page.
_GRAPH_PROBLEMS_JS = """
() => {
  const problems = [];
  for (const node of app.graph._nodes) {
    if (!LiteGraph.registered_node_types[node.type]) {
      problems.push(`node ${node.id}: type ${node.type} is not registered`);
      continue;
    }
    if (node.has_errors) problems.push(`node ${node.id} (${node.type}) is marked with errors`);
    for (const w of node.widgets ?? []) {
      const opts = w.options ?? {};
      if (w.type === "combo") {
        const values = typeof opts.values === "function" ? opts.values(w, node) : opts.values;
        if (!Array.isArray(values) || !values.includes(w.value))
          problems.push(`node ${node.id} (${node.type}) widget ${w.name}: ${JSON.stringify(w.value)} not in ${JSON.stringify(values)}`);
      } else if (w.type === "number") {
        if (typeof w.value !== "number" || !Number.isFinite(w.value)
            || (opts.min !== undefined && w.value < opts.min) || (opts.max !== undefined && w.value > opts.max))
          problems.push(`node ${node.id} (${node.type}) widget ${w.name}: ${w.value} outside [${opts.min}, ${opts.max}]`);
      } else if (w.type === "toggle") {
        if (typeof w.value !== "boolean") problems.push(`node ${node.id} (${node.type}) widget ${w.name}: ${w.value} is not a boolean`);
      }
    }
  }
  return problems;
}
"""

_SHOWN_IMAGE_JS = """
(nodeId) => {
  const node = app.graph.getNodeById(nodeId);
  const img = node?.imgs?.[0];
  if (!img || !img.complete || !img.naturalWidth) return null;
  return {src: img.src, width: img.naturalWidth, height: img.naturalHeight};
}
"""


def quiet_settings(server) -> None:
    for key, value in {**QUIET_SETTINGS, **SCREENSHOT_SETTINGS}.items():
        server.post_json(f"/settings/{key}", value)


class Editor:
    """One page of ComfyUI's editor."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.console_errors: list[str] = []
        page.on("pageerror", lambda error: self.console_errors.append(str(error)))

    def open(self, timeout_s: float = 120) -> "Editor":
        self.page.goto(self.server.url("/"))
        self.page.wait_for_function(
            "window.app && window.app.graph && window.LiteGraph"
            " && Object.keys(LiteGraph.registered_node_types).length > 50"
            " && document.querySelector('button[aria-label=\"Run\"]')",
            timeout=timeout_s * 1000,
        )
        return self

    # --- graphs ------------------------------------------------------------------------------------
    def load_ui(self, workflow: dict, name: str) -> None:
        self.page.evaluate("async ([w, n]) => { await app.loadGraphData(w, true, true, n) }", [workflow, name])
        self.settle()

    def load_api(self, prompt: dict, name: str) -> None:
        self.page.evaluate("async ([p, n]) => { await app.loadApiJson(p, n) }", [prompt, name])
        self.settle()

    def fix_seeds(self) -> int:
        """Sets every seed's "control after generate" to fixed, so a shipped workflow reproduces its picture."""
        return self.page.evaluate("""() => {
            let n = 0;
            for (const node of app.graph._nodes)
                for (const w of node.widgets ?? [])
                    if (w.name === "control_after_generate") { w.value = "fixed"; n++; }
            return n;
        }""")

    def settle(self) -> None:
        """Lets the canvas draw twice: nodes take their drawn size on the first frame."""
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        self.page.evaluate("() => { app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true); }")

    # The editor's Export writes JSON.stringify of graphToPrompt()'s `workflow` (UI) or `output` (API):
    # stringifying in the page keeps its exact format (undefined members left out, not turned into null).
    def serialize(self) -> dict:
        """The UI workflow, as the editor's Export writes it."""
        return json.loads(self.page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).workflow)"))

    def to_prompt(self) -> dict:
        """The API prompt the editor queues and exports: its own conversion (app.graphToPrompt)."""
        return json.loads(self.page.evaluate("async () => JSON.stringify((await app.graphToPrompt()).output)"))

    def problems(self) -> list[str]:
        found = self.page.evaluate(_GRAPH_PROBLEMS_JS)
        dialog = self.page.locator(".p-dialog:visible")
        if dialog.count():
            found.append("a dialog is open: " + " | ".join(dialog.all_inner_texts())[:500])
        return found

    def open_templates(self, category: str):
        """Opens the template browser on a category of its sidebar (a pack's name); returns the dialog."""
        self.page.locator('button[aria-label="Templates"]').first.click()
        dialog = self.page.locator(".p-dialog").first
        dialog.get_by_text(category, exact=True).click()
        dialog.get_by_text("templates", exact=False).last.wait_for()
        self.page.wait_for_timeout(1000)  # thumbnails load lazily
        return dialog

    # --- what a user does --------------------------------------------------------------------------
    def type_into(self, node_id: int, widget: str, text: str) -> None:
        """Replaces a multiline text widget's text by typing into its text box on the page."""
        marker = f"omni-{node_id}-{widget}"
        found = self.page.evaluate(
            """([id, name, marker]) => {
                const w = app.graph.getNodeById(id)?.widgets?.find(w => w.name === name);
                const el = w?.element ?? w?.inputEl;
                if (!el) return false;
                el.setAttribute("data-omni-test", marker);
                return true;
            }""",
            [node_id, widget, marker],
        )
        if not found:
            raise LookupError(f"node {node_id} has no text box for widget {widget!r}")
        box = self.page.locator(f'[data-omni-test="{marker}"]')
        box.click()
        box.fill(text)

    def replace_text_encoders(self, node_type: str) -> list[int]:
        """Replaces every CLIPTextEncode by a `node_type` node (same id, place, text and links) and removes the
        CLIPLoaders that fed them, as a user would rewire the graph; returns the replaced nodes' ids."""
        return self.page.evaluate("""(nodeType) => {
            const graph = app.graph;
            const replaced = [];
            for (const old of [...graph._nodes].filter(n => n.type === "CLIPTextEncode")) {
                const id = old.id, pos = [...old.pos], text = old.widgets.find(w => w.name === "text").value;
                const targets = (old.outputs[0].links ?? []).map(l => graph.getLink?.(l) ?? graph.links.get?.(l) ?? graph.links[l])
                    .map(link => [link.target_id, link.target_slot]);
                const clip = graph.getLink?.(old.inputs[0].link) ?? graph.links.get?.(old.inputs[0].link) ?? graph.links[old.inputs[0].link];
                graph.remove(old);
                if (clip) {
                    const loader = graph.getNodeById(clip.origin_id);
                    if (loader && !(loader.outputs[0].links ?? []).length) graph.remove(loader);
                }
                const node = LiteGraph.createNode(nodeType);
                node.id = id;
                node.pos = pos;
                graph.add(node);
                node.widgets.find(w => w.name === "text").value = text;
                for (const [target, slot] of targets) node.connect(0, graph.getNodeById(target), slot);
                replaced.push(node.id);
            }
            graph.setDirtyCanvas(true, true);
            return replaced;
        }""", node_type)

    def widget_value(self, node_id: int, widget: str):
        return self.page.evaluate(
            "([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value", [node_id, widget])

    def click_run(self) -> str:
        """Presses the Run button; returns the prompt id the server gave the queued prompt."""
        with self.page.expect_response(
            lambda r: r.url.endswith("/prompt") and r.request.method == "POST", timeout=60_000
        ) as response:
            self.page.locator('button[aria-label="Run"]').first.click()
        body = response.value.json()
        if "prompt_id" not in body:
            raise RuntimeError(f"the server refused the prompt queued from the editor: {json.dumps(body)[:2000]}")
        return body["prompt_id"]

    def wait_for_image(self, node_id: int, timeout_s: float = 300) -> dict:
        """Waits until the node shows an output image on the page; returns its address and size."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        self.fit_view()  # the editor loads a node's images when it draws the node: it must be in view
        try:
            handle = self.page.wait_for_function(_SHOWN_IMAGE_JS, arg=node_id, timeout=timeout_s * 1000)
        except PlaywrightTimeout:
            outputs = self.page.evaluate("() => JSON.stringify(app.nodeOutputs ?? null)")
            raise TimeoutError(f"node {node_id} shows no image after {timeout_s} s; the editor's node outputs: "
                               f"{outputs[:2000]}") from None
        return handle.json_value()

    def wait_for_output(self, node_id: int, timeout_s: float = 300) -> dict:
        """Waits until the editor has received the node's output files (a video's, which it shows in a player);
        returns the first file's entry (filename, subfolder, type)."""
        handle = self.page.wait_for_function(
            "(id) => { const out = app.nodeOutputs?.[String(id)]; return out?.images?.[0] ?? null; }",
            arg=node_id, timeout=timeout_s * 1000)
        return handle.json_value()

    def fit_view(self) -> None:
        self.page.evaluate("() => app.canvas.deselectAll()")  # Fit View fits the selection when there is one
        self.page.locator('button[aria-label^="Fit View"]').first.click()
        self.page.wait_for_timeout(500)  # the fit is animated
        self.settle()

    def screenshot(self, path: Path, fit: bool = True) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fit:
            self.fit_view()
        self.page.screenshot(path=str(path))
        return path


@contextlib.contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y --no-install-recommends chromium)"
            " or set OMNI_ACCEL_CHROMIUM to a Chromium executable")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run"],
        )
        try:
            yield instance
        finally:
            instance.close()


@contextlib.contextmanager
def editor(instance, server):
    quiet_settings(server)
    page = instance.new_page(viewport=VIEWPORT)
    try:
        yield Editor(page, server).open()
    finally:
        page.close()
