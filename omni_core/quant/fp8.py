"""FP8 Quantize: a load-time recipe entry that stores the DiT's linear layers in FP8 (E4M3), once per loaded
variant. The family's precision-sensitive layers (modulation/adaLN, embeddings, norms, final projection)
and the user's `ignored_layers` keep full precision."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..devices import DTYPE_BYTES
from ..errors import IncompatibleStack, InvalidInput, OmniError
from ..memory import module_bytes
from ..recipe import Accelerator
from ..settings import setting
from ..weights import open_weights
from ..weights.fp8_linear import FP8Linear, NonFiniteWeights, can_multiply_in_fp8
from ..weights.precision import precision_of

MODES = ("auto", "w8a8", "weight_only")
SCALES = ("per_tensor", "per_channel")
# vLLM-Omni's fused layer names (the seed's --ignored-layers examples) -> the diffusers layers they fuse.
VLLM_FUSED_NAMES = {
    "add_kv_proj": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "to_qkv": ("to_q", "to_k", "to_v"),
    "qkv_proj": ("to_q", "to_k", "to_v"),
}


class NonFiniteOutput(OmniError, FloatingPointError):
    pass


def parse_ignored_layers(text: str) -> tuple[str, ...]:
    """'add_kv_proj, to_add_out' -> ('add_kv_proj', 'to_add_out')."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def collapsed(name: str) -> str:
    """Layer names with block indices folded: transformer_blocks.3.attn.to_q -> transformer_blocks.*.attn.to_q."""
    return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)


@dataclass
class LayerPlan:
    quantize: list[str] = field(default_factory=list)
    kept: dict[str, list[str]] = field(default_factory=dict)  # reason -> layer names
    unmatched: list[str] = field(default_factory=list)  # ignored_layers entries that matched no linear layer


def plan_layers(module: torch.nn.Module, family, ignored: tuple[str, ...]) -> LayerPlan:
    plan = LayerPlan()
    hits = {pattern: 0 for pattern in ignored}
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.Linear):
            continue
        reason = next((fact.reason for fact in family.precision_sensitive if fact.matches(name)), None)
        if reason is None:
            for pattern in ignored:
                if any(part in name for part in VLLM_FUSED_NAMES.get(pattern, (pattern,))):
                    hits[pattern] += 1
                    reason = f"ignored_layers '{pattern}'"
                    break
        if reason is None:
            plan.quantize.append(name)
        else:
            plan.kept.setdefault(reason, []).append(name)
    plan.unmatched = [pattern for pattern, count in hits.items() if count == 0]
    return plan


def fp8_hardware(device: str) -> tuple[bool, str]:
    """Whether the device multiplies FP8 in hardware, and why (for the report)."""
    if not device.startswith("cuda"):
        return False, "the CPU has no FP8 matrix unit (torch._scaled_mm runs a slow reference kernel there)"
    major, minor = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if (major, minor) >= (8, 9):
        return True, f"{name} (SM {major}.{minor}) multiplies FP8 in hardware"
    return False, f"{name} is SM {major}.{minor}; FP8 matrix multiply needs SM 8.9 (Ada, Hopper) or newer"


def _counted(names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[collapsed(name)] = counts.get(collapsed(name), 0) + 1
    return counts


def _bytes_with_bf16_rest(module: torch.nn.Module) -> int:
    """Weight bytes if every tensor that is not FP8 data or an FP8 scale were bf16: what the model would take
    loaded in bf16, whatever dtype it runs in here."""
    exact = {}
    for child in module.modules():
        if isinstance(child, FP8Linear):
            exact[id(child.weight)] = child.weight.numel()  # 1 byte per value
            exact[id(child.weight_scale)] = child.weight_scale.numel() * 4
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(exact.get(key, t.numel() * (2 if t.is_floating_point() else t.element_size()))
               for key, t in tensors.items())


def _stored_fp8(spec) -> bool:
    """Whether the pipe's DiT file(s) already store linear layers in fp8."""
    return any(precision_of(open_weights(path)).fp8_layers for attr, path in spec.files
               if attr in spec.model_family.denoiser_attrs)


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    sample = getattr(output, "sample", None)
    return _tensors(sample) if sample is not None else []


@dataclass(frozen=True)
class FP8Quantize(Accelerator):
    kind: ClassVar[str] = "quantization"
    display_name: ClassVar[str] = "FP8 Quantize"
    exclusive_group: ClassVar[str] = "quantization"
    load_time: ClassVar[bool] = True
    load_order: ClassVar[int] = 10

    mode: str = setting(
        str, "auto", "auto: w8a8 where the GPU multiplies FP8 in hardware (CUDA SM 8.9+: Ada, Hopper), weight_only "
        "elsewhere. w8a8: activations quantized on the fly, FP8 matrix multiply (1.3-1.5x on such GPUs). weight_only: "
        "FP8 storage, multiplication in the model dtype (any device, the memory saving without the speedup).",
        choices=MODES)
    ignored_layers: tuple[str, ...] = setting(
        str, "", "Comma-separated parts of layer names that keep full precision, on top of the model's own "
        "(modulation, embeddings, norms, final projection), e.g. add_kv_proj,to_add_out (vLLM-Omni's fused names "
        "are understood).", parse=parse_ignored_layers)
    scale: str = setting(
        str, "per_tensor", "Scale granularity: per_tensor (one scale per weight, per-tensor activation scales) or "
        "per_channel (one per output channel, per-token activation scales; more precise).", choices=SCALES)

    def check_values(self) -> None:
        for pattern in self.ignored_layers:
            if not re.fullmatch(r"[\w.\-]+", pattern):
                raise InvalidInput("ignored_layers", f"'{pattern}' is not a layer name part.",
                                   "comma-separated parts of layer names, e.g. add_kv_proj,to_add_out")

    # --- checks -----------------------------------------------------------------------------------
    def check_model(self, spec) -> None:
        for attr, path in spec.files:
            if open_weights(path).format == "gguf":
                raise IncompatibleStack(
                    f"FP8 Quantize cannot quantize the {attr} of this pipe: it comes from the GGUF file "
                    f"{path.rsplit('/', 1)[-1]}, which is already quantized. Remove FP8 Quantize, or pick a "
                    "safetensors transformer file (or none) in Omni Loader."
                )
        if self.mode == "w8a8" and spec.device.startswith("cuda"):
            hardware, why = fp8_hardware(spec.device)
            if not hardware:
                raise IncompatibleStack(f"FP8 Quantize mode w8a8: {why}. Use mode weight_only (or auto).")

    def compute(self, device: str) -> tuple[bool, str, str]:
        """(multiply in FP8?, mode used, why)."""
        hardware, why = fp8_hardware(device)
        if self.mode == "weight_only":
            return False, "weight_only", "weight_only was asked for: FP8 storage, multiplication in the model dtype"
        if self.mode == "w8a8":
            if hardware:
                return True, "w8a8", why
            return True, "w8a8", f"w8a8 was asked for; {why}: correct but slower than weight_only"
        if hardware:
            return True, "w8a8", f"auto: {why}"
        return False, "weight_only", f"auto: {why}; FP8 storage, multiplication in the model dtype"

    # --- load time --------------------------------------------------------------------------------
    def component_bytes(self, spec, components: dict[str, int]) -> dict[str, int]:
        if _stored_fp8(spec):
            return components  # the file's FP8 layers are used as stored
        family = spec.model_family
        float_bytes = DTYPE_BYTES[spec.dtype]
        components = dict(components)
        for attr in family.denoiser_attrs:
            if attr not in components:
                continue
            model = spec.source.empty_component(attr)
            plan = plan_layers(model, family, self.ignored_layers)
            modules = dict(model.named_modules())
            for name in plan.quantize:
                linear = modules[name]
                scale_bytes = 4 * (linear.out_features if self.scale == "per_channel" else 1)
                components[attr] -= linear.weight.numel() * (float_bytes - 1) - scale_bytes
        return components

    def prepare(self, loading) -> None:
        family, spec = loading.family, loading.spec
        fp8_matmul, used, why = self.compute(spec.device)
        if _stored_fp8(spec):
            self._use_stored(loading, fp8_matmul, used, why)
            return
        per_channel = self.scale == "per_channel"
        before = after = bf16 = after_bf16 = 0
        quantized, kept, fallbacks = [], {}, []
        plan = None
        for attr, denoiser in family.denoisers(loading.pipeline).items():
            before += module_bytes(denoiser)
            bf16 += _bytes_with_bf16_rest(denoiser)
            plan = plan_layers(denoiser, family, self.ignored_layers)
            modules = dict(denoiser.named_modules())
            for name in plan.quantize:
                linear = modules[name]
                fast = fp8_matmul and can_multiply_in_fp8(linear.in_features, linear.out_features, torch.device(spec.device))
                if fp8_matmul and not fast:
                    fallbacks.append(name)
                parent_name, _, child = name.rpartition(".")
                try:
                    replacement = FP8Linear.quantized(linear, f"{attr}.{name}", per_channel, fast)
                except NonFiniteWeights as exc:
                    raise InvalidInput("FP8 Quantize", f"{exc}.", "a model with finite weights") from None
                setattr(modules[parent_name] if parent_name else denoiser, child, replacement)
            after += module_bytes(denoiser)
            after_bf16 += _bytes_with_bf16_rest(denoiser)
            quantized += plan.quantize
            for reason, names in plan.kept.items():
                kept.setdefault(reason, []).extend(names)
        facts = {
            "method": "fp8 (e4m3fn)",
            "mode": used,
            "mode_requested": self.mode,
            "why": why,
            "scale": self.scale,
            "activation_scale": ("per token" if per_channel else "per tensor") + ", dynamic" if fp8_matmul else None,
            "layers_quantized": len(quantized),
            "quantized": _counted(quantized),
            "kept": {reason: _counted(names) for reason, names in kept.items()},
            "dit_weight_bytes": {"before": before, "after": after, "ratio": round(after / max(before, 1), 4),
                                 "bf16": bf16, "after_with_bf16_rest": after_bf16,
                                 "ratio_vs_bf16": round(after_bf16 / max(bf16, 1), 4)},
        }
        if fallbacks:
            facts["weight_only_layers"] = _counted(fallbacks)
        loading.prepared[self.kind] = facts
        if plan is not None and plan.unmatched:
            examples = sorted({collapsed(n) for n in quantized})[:6]
            loading.notes.append(
                f"FP8 Quantize: ignored_layers {', '.join(repr(p) for p in plan.unmatched)} matched no linear layer "
                f"of this {family.name} model (layer names look like {', '.join(examples)})"
            )

    def _use_stored(self, loading, fp8_matmul: bool, used: str, why: str) -> None:
        """A DiT file stored in fp8 (fp8, fp8_scaled, mixed) keeps its own FP8 layers and scales, as ComfyUI does:
        re-quantizing would only add rounding. This node then decides how they multiply."""
        layers = [m for d in loading.family.denoisers(loading.pipeline).values() for m in d.modules()
                  if isinstance(m, FP8Linear)]
        device = torch.device(loading.spec.device)
        for layer in layers:
            layer.fp8_matmul = fp8_matmul and can_multiply_in_fp8(layer.in_features, layer.out_features, device)
        loading.prepared[self.kind] = {
            "method": "fp8 (e4m3fn), as stored in the file", "mode": used, "mode_requested": self.mode, "why": why,
            "scale": "the file's", "layers_quantized": 0, "layers_fp8_in_file": len(layers),
            "multiplied_in_fp8": sum(layer.fp8_matmul for layer in layers),
        }
        if self.scale != "per_tensor" or self.ignored_layers:
            loading.notes.append("FP8 Quantize: scale and ignored_layers do not apply to a diffusion model file "
                                 "stored in fp8; its own FP8 layers and scales are used")

    # --- run time ---------------------------------------------------------------------------------
    @contextmanager
    def applied(self, run) -> Iterator[None]:
        """Checks every transformer call's output; a non-finite one is an error naming the FP8 layer at fault."""
        def check(module, args, output):
            if all(torch.isfinite(t).all() for t in _tensors(output)):
                return
            layers = [m for m in module.modules() if isinstance(m, FP8Linear)]
            culprit = next((m.name for m in layers if m.finite is not None and not bool(m.finite)), None)
            where = (f"layer {culprit} produced non-finite values (NaN or inf)" if culprit else
                     "the transformer output is not finite, though no FP8 layer produced non-finite values")
            raise NonFiniteOutput(
                f"FP8 Quantize: at step {run.steps_done + 1}, {where}. Add the layer to ignored_layers, try "
                "scale per_channel, or remove FP8 Quantize."
            )

        with ExitStack() as stack:
            for denoiser in run.denoisers().values():
                stack.callback(denoiser.register_forward_hook(check).remove)
            yield
