"""What every Omni Accel node shares: the OMNI_PIPE socket type and input checks derived from the schema.

ComfyUI 0.3.75 checks neither V3 combo values nor, once a node defines `validate_inputs(**kwargs)`, any
min/max; and NaN passes every range comparison. So each node's inputs are checked here against its own
schema: at queue time for the values known then (HTTP 400 before any work), and again when the node runs,
when values that arrived through links are known too.
"""

from __future__ import annotations

import math

from comfy_api.latest import io

from ..omni_core import InvalidInput, OmniError

CATEGORY = "Omni Accel"
OmniPipeType = io.Custom("OMNI_PIPE")


def schema_problem(schema: io.Schema, values: dict) -> str | None:
    """The first input whose value the schema does not allow, as a message naming it, or None.
    Values that are None (links not resolved yet) are skipped."""
    for spec in schema.inputs or []:
        value = values.get(spec.id)
        if value is None:
            continue
        name = spec.id
        if isinstance(spec, io.Combo.Input):
            if value not in spec.options:
                shown = spec.options if len(spec.options) <= 20 else f"{len(spec.options)} options"
                return f"{name}: '{value}' is not one of the choices. Valid: {shown}."
            continue
        if not isinstance(spec, (io.Int.Input, io.Float.Input)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}: {value!r} is not a number."
        if isinstance(spec, io.Float.Input) and not math.isfinite(value):
            return f"{name}: {value} is not a finite number. Valid: {spec.min} to {spec.max}."
        if spec.min is not None and value < spec.min:
            return f"{name}: Value {value} smaller than min of {spec.min}."
        if spec.max is not None and value > spec.max:
            return f"{name}: Value {value} bigger than max of {spec.max}."
    return None


class OmniNode(io.ComfyNode):
    """Subclasses define `define_schema`, `run(**inputs)` and optionally `check(**inputs)` (raising OmniError
    for combinations the schema cannot express; called with the values known, others None)."""

    @classmethod
    def check(cls, **inputs) -> None:
        pass

    @classmethod
    def validate_inputs(cls, **inputs) -> bool | str:
        problem = schema_problem(cls.define_schema(), inputs)
        if problem:
            return problem
        try:
            cls.check(**inputs)
        except OmniError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        problem = schema_problem(cls.define_schema(), inputs)
        if problem:
            name, _, rest = problem.partition(": ")
            raise InvalidInput(name, rest)
        cls.check(**inputs)
        return cls.run(**inputs)

    @classmethod
    def run(cls, **inputs) -> io.NodeOutput:
        raise NotImplementedError
