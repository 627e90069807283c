"""Values of the wrong kind in a queued prompt are refused with a 400 naming the input.

Before ComfyUI validates a prompt it converts literal widget values to their input's type in place
(`int(2.5)` is 2, `bool("no")` is True, `str(5)` is "5"), so a node's own `validate_inputs` never sees what
was sent. This pack's nodes check values against their schema (schema.py); for literal values that would be
converted silently, a handler on ComfyUI's prompt hook (it sees the prompt as posted) puts in their place a
value that ComfyUI's own conversion refuses, carrying the reason. Values that arrive through links are
checked when the node runs (base.py).
"""

from __future__ import annotations

import logging

from .schema import widget_setting

log = logging.getLogger("omni_accel")


class RefusedValue(str):
    """Text for the error response; any conversion of it to a number, boolean or plain text fails with it."""

    def _refuse(self, *args):
        raise ValueError(str.__str__(self))

    __str__ = __bool__ = __int__ = __float__ = __index__ = _refuse

    def __format__(self, spec: str) -> str:
        return str.__str__(self)


def refuse_wrong_kinds(prompt: dict, schemas: dict) -> None:
    """Replaces, in place, each literal input of a node in `schemas` (class_type -> V3 schema) whose value is not
    of its input's kind (a fraction or non-finite number for an int, a bool for a number, a non-string for
    text, a non-boolean for a boolean)."""
    for node in prompt.values():
        schema = schemas.get(node.get("class_type")) if isinstance(node, dict) else None
        inputs = node.get("inputs") if schema is not None else None
        if not isinstance(inputs, dict):
            continue
        for spec in schema.inputs or []:
            value = inputs.get(spec.id)
            declared = widget_setting(spec)
            if declared is None or value is None or isinstance(value, list) or declared.choices is not None:
                continue  # absent, linked (checked when the node runs) or a list to pick from (validate_inputs)
            kind_only = declared.__class__(declared.kind, declared.default, "")  # ranges: validate_inputs
            problem = kind_only.problem(value)
            if problem:
                inputs[spec.id] = RefusedValue(f"{spec.id}: {problem} Valid: {declared.valid_text()}.")


def install(server, node_classes) -> None:
    """Adds the check to ComfyUI's prompt hook (never able to break a prompt: errors are logged)."""
    schemas = {cls.define_schema().node_id: cls.define_schema() for cls in node_classes}

    def on_prompt(json_data):
        try:
            prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
            if isinstance(prompt, dict):
                refuse_wrong_kinds(prompt, schemas)
        except Exception:
            log.exception("Omni Accel: checking a queued prompt's values failed")
        return json_data

    server.add_on_prompt_handler(on_prompt)
