"""Convert between ComfyUI's API prompt format and its UI workflow format (LiteGraph, version 0.4).

UI workflows keep widget values positionally (`widgets_values`, in INPUT_TYPES order, with an extra
"control" value after widgets that have control_after_generate) and connections in `links`. Both
directions need the node definitions from /object_info.

  python tools/workflow_format.py   # regenerate workflows/*.json (UI) from workflows/*_api.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    spec = info["input"]
    return [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control(spec: list) -> bool:
    return len(spec) > 1 and isinstance(spec[1], dict) and bool(spec[1].get("control_after_generate"))


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    order = {node_id: i for i, node_id in enumerate(prompt)}
    nodes, links = [], []
    outgoing: dict[tuple[str, int], list[int]] = {}
    for target_id, node in prompt.items():
        info = object_info[node["class_type"]]
        link_inputs = [name for name, spec in _ordered_inputs(info) if not _is_widget(spec)]
        for slot, name in enumerate(link_inputs):
            value = node["inputs"].get(name)
            if isinstance(value, list):
                link_id = len(links) + 1
                source_id, source_slot = value
                kind = object_info[prompt[source_id]["class_type"]]["output"][source_slot]
                links.append([link_id, int(source_id), source_slot, int(target_id), slot, kind])
                outgoing.setdefault((source_id, source_slot), []).append(link_id)

    column_x: dict[str, int] = {}

    def column(node_id: str) -> int:  # one column right of its rightmost source
        if node_id not in column_x:
            sources = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
            column_x[node_id] = max((column(s) + 1 for s in sources), default=0)
        return column_x[node_id]

    for node_id in prompt:
        column(node_id)
    rows: dict[int, int] = {}
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        col = column_x[node_id]
        row = rows.get(col, 0)
        rows[col] = row + 1
        inputs, widgets = [], []
        for name, spec in _ordered_inputs(info):
            value = node["inputs"].get(name)
            if _is_widget(spec):
                widgets.append(value if value is not None else spec[1].get("default") if len(spec) > 1 else None)
                if _has_control(spec):
                    widgets.append("fixed")
            else:
                link = next((l[0] for l in links if l[3] == int(node_id) and l[4] == len(inputs)), None)
                inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": link})
        outputs = [
            {"name": name, "type": kind, "links": outgoing.get((node_id, slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))
        ]
        nodes.append({
            "id": int(node_id),
            "type": node["class_type"],
            "pos": [40 + 380 * col, 60 + 330 * row],
            "size": [340, 280],
            "flags": {},
            "order": order[node_id],
            "mode": 0,
            "inputs": inputs,
            "outputs": outputs,
            "title": node.get("_meta", {}).get("title", info["display_name"]),
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        })
    return {
        "last_node_id": max(int(n) for n in prompt),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
        "version": 0.4,
    }


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """What the frontend's "Queue" sends, for workflows of plain nodes (no groups/subgraphs/reroutes)."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        if node.get("mode", 0) != 0:
            continue  # muted or bypassed
        info = object_info[node["type"]]
        values = list(node.get("widgets_values", []))
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, spec in _ordered_inputs(info):
            if _is_widget(spec):
                inputs[name] = values.pop(0)
                if _has_control(spec):
                    values.pop(0)
            elif name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _regenerate() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.comfy_harness import ROOT, ComfyServer

    with tempfile.TemporaryDirectory() as tmp, ComfyServer(Path(tmp)) as server:
        object_info = server.get_json("/object_info")
    for api_path in sorted((ROOT / "workflows").glob("*_api.json")):
        ui_path = api_path.with_name(api_path.name.replace("_api.json", ".json"))
        ui = api_to_ui(json.loads(api_path.read_text()), object_info)
        ui_path.write_text(json.dumps(ui, indent=2) + "\n")
        print(ui_path)


if __name__ == "__main__":
    _regenerate()
