"""Node inputs derived from omni_core's setting declarations (omni_core/settings.py), and the one check of
every input value against what its schema allows."""

from __future__ import annotations

from collections.abc import Iterable

from comfy_api.latest import io

from ..omni_core.settings import Setting, settings_of


def input_for(name: str, declared: Setting) -> io.Input:
    common = {"default": declared.default, "tooltip": declared.tooltip, "optional": declared.optional}
    if declared.choices is not None:
        return io.Combo.Input(name, options=list(declared.choices), **common)
    if declared.kind is bool:
        return io.Boolean.Input(name, **common)
    if declared.kind is str:
        return io.String.Input(name, multiline=declared.multiline, **common)
    if declared.kind is int:
        return io.Int.Input(name, min=declared.min, max=declared.max, step=declared.step,
                            control_after_generate=declared.control_after_generate or None, **common)
    return io.Float.Input(name, min=declared.min, max=declared.max, step=declared.step, round=declared.round, **common)


def inputs_for(config: type, names: Iterable[str] | None = None) -> list[io.Input]:
    """The V3 inputs of a core config class's settings, in declaration order (or in `names`' order)."""
    return [input_for(name, declared) for name, declared in settings_of(config, names).items()]


def widget_setting(spec: io.Input) -> Setting | None:
    """What a widget input allows, as a Setting (sockets such as IMAGE or OMNI_PIPE: None)."""
    if isinstance(spec, io.Combo.Input):
        return Setting(str, spec.default, "", choices=tuple(spec.options))
    for kind, input_class in ((bool, io.Boolean.Input), (int, io.Int.Input), (float, io.Float.Input),
                              (str, io.String.Input)):
        if isinstance(spec, input_class):
            return Setting(kind, spec.default, "", min=getattr(spec, "min", None), max=getattr(spec, "max", None))
    return None


def schema_problem(schema: io.Schema, values: dict) -> str | None:
    """The first input whose value the schema does not allow, as a message naming it, or None. Values that
    are None (links not resolved yet) are skipped."""
    for spec in schema.inputs or []:
        value = values.get(spec.id)
        declared = widget_setting(spec)
        if value is None or declared is None:
            continue
        problem = declared.problem(value)
        if problem:
            if declared.choices is not None and len(declared.choices) > 20:
                return f"{spec.id}: {problem} Valid: {len(declared.choices)} options (the node lists them)."
            return f"{spec.id}: {problem} Valid: {declared.valid_text()}."
    return None
