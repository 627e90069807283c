"""What every Omni Accel node shares: the OMNI_PIPE socket type and input checks derived from the schema.

ComfyUI 0.3.75 checks neither V3 combo values nor, once a node defines `validate_inputs(**kwargs)`, any
min/max; NaN passes every range comparison, and values that arrive through links are not checked at all.
So each node's inputs are checked here against its own schema (numbers finite, ints whole, booleans and
strings of their type, combos among their options): at queue time for the values known then (HTTP 400
before any work), and again when the node runs, when values that arrived through links are known too.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..omni_core import InvalidInput, OmniError, OmniPipe
from .schema import schema_problem

CATEGORY = "Omni Accel"
OmniPipeType = io.Custom("OMNI_PIPE")


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
        _refuse_models_on_pipe_inputs(cls.define_schema(), inputs)
        cls.check(**inputs)
        return cls.run(**inputs)

    @classmethod
    def run(cls, **inputs) -> io.NodeOutput:
        raise NotImplementedError


def _refuse_models_on_pipe_inputs(schema: io.Schema, values: dict) -> None:
    """The cache nodes' output is a MODEL when a MODEL went in; the editor keeps it from OMNI_PIPE inputs, a
    prompt written by hand may not."""
    for spec in schema.inputs or []:
        value = values.get(spec.id)
        if spec.get_io_type() == OmniPipeType.io_type and value is not None and not isinstance(value, OmniPipe):
            raise InvalidInput(spec.id, f"got {type(value).__name__}, not an OMNI_PIPE: a cache node given ComfyUI's "
                               "MODEL returns a MODEL, which goes to KSampler (or another sampler node), not to "
                               "Omni Accel's Sampler or other OMNI_PIPE nodes.", "an OMNI_PIPE from Omni Loader")
