"""Tensor parallelism (DTensor) for the pack's DiT transformers: every rank holds a 1/N slice of each large linear.

The plan follows the Megatron pattern, applied with torch's `parallelize_module` (which runs on gloo/CPU, unlike
diffusers' `enable_parallelism(TensorParallelConfig)`):

- attention q/k/v (and the joint stream's add_q/k/v) are split by heads (colwise: output rows, local result);
  the output projection is rowwise (input columns; partial sums are all-reduced, the bias added once);
- feed-forward in colwise, out rowwise (the activation between them is elementwise);
- AdaLN modulation linears (per block, the final norm's, Wan's time projection) colwise with the output
  all-gathered, and the root's timestep/text embedding MLPs colwise then rowwise. These hold a large share of
  the weights (Qwen-Image's img_mod/txt_mod alone are a third of a block); without them no family reaches half.

Per family:

- Qwen-Image and Flux processors reshape by head_dim and infer the local head count from the width, so
  `attn.heads` stays as is. Z-Image's and Wan's reshape by `attn.heads`, so it is set to the local count.
- Flux's single block feeds proj_out with concat(attention, mlp): both halves are split, so proj_out keeps, on
  each rank, the input columns of its own attention slice followed by those of its mlp slice (a "packed" rowwise
  split), and its sum over ranks is the full product.
- Wan's norm_q/norm_k are RMSNorms over the full width (all heads together), not per head: they become
  distributed RMSNorms (this rank's weight slice, the sum of squares all-reduced), so q/k stay split.

Weights are sliced from each rank's own full copy (every rank loads the same files; nothing is broadcast).

FP8: the pack's FP8Linear is not an nn.Linear, which torch's styles refuse, and a DTensor weight does not mix with
its plain scale. An FP8Linear in the plan is therefore replaced by `TensorParallelFP8Linear`, holding this rank's
FP8 rows (colwise, with their per-row scales) or columns (rowwise, with the whole scales, computed over full rows
when quantized) as plain tensors; rowwise multiplies locally, all-reduces, then adds the bias once.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from ..weights.fp8_linear import FP8, FP8_MAX, FP8Linear, _scale_for, fp8_product


class PackedRowwiseParallel(RowwiseParallel):
    """Rowwise over an input that concatenates independently split parts (`blocks`: their full widths): each
    rank keeps, for every part in order, the columns of its own slice of that part."""

    def __init__(self, blocks: list[int]):
        super().__init__()
        self.blocks = list(blocks)

    def _partition_linear_fn(self, name, module, device_mesh):
        index = _local_index(self.blocks, device_mesh.get_local_rank(), device_mesh.size())
        local = module.weight.detach()[:, index].contiguous()
        weight = DTensor.from_local(local, device_mesh, [Shard(1)], run_check=False,
                                    shape=module.weight.shape, stride=module.weight.stride())
        module.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))
        if module.bias is not None:
            bias = distribute_tensor(module.bias.detach(), device_mesh, [Replicate()], src_data_rank=None)
            module.register_parameter("bias", torch.nn.Parameter(bias, requires_grad=False))

    def __repr__(self) -> str:
        return f"PackedRowwiseParallel(blocks={self.blocks})"


class HeadShardedRMSNorm(ParallelStyle):
    """An RMSNorm over the full width of heads-split activations: the weight is split like the heads and the
    sum of squares is all-reduced, so each rank normalizes its slice by the full row's mean square."""

    def _apply(self, module, device_mesh):
        module._tp_width = module.weight.shape[-1]
        module._tp_group = device_mesh.get_group()
        weight = distribute_tensor(module.weight.detach(), device_mesh, [Shard(0)], src_data_rank=None)
        module.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))
        module.forward = types.MethodType(_head_sharded_rms_forward, module)
        return module

    def __repr__(self) -> str:
        return "HeadShardedRMSNorm()"


def _head_sharded_rms_forward(self, x: torch.Tensor) -> torch.Tensor:
    upcast = x.float()
    squares = upcast.pow(2).sum(-1, keepdim=True)
    dist.all_reduce(squares, group=self._tp_group)
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    out = upcast * torch.rsqrt(squares / self._tp_width + eps)
    if self.weight is not None:
        out = out * self.weight.to_local().float()
    return out.to(x.dtype)


class LocalHeads(ParallelStyle):
    """Sets an attention module's `heads` to this rank's count, for processors that reshape by `attn.heads`."""

    def _apply(self, module, device_mesh):
        module.heads //= device_mesh.size()
        return module

    def __repr__(self) -> str:
        return "LocalHeads()"


def _colwise() -> ColwiseParallel:
    return ColwiseParallel()


def _rowwise() -> RowwiseParallel:
    return RowwiseParallel()


def _gathered() -> ColwiseParallel:
    return ColwiseParallel(output_layouts=Replicate())


def _attention(plan: dict, prefix: str, attn: torch.nn.Module, local_heads: bool) -> None:
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        if getattr(attn, name, None) is not None:
            plan[f"{prefix}.{name}"] = _colwise()
    if getattr(attn, "to_out", None) is not None:
        plan[f"{prefix}.to_out.0"] = _rowwise()
    if getattr(attn, "to_add_out", None) is not None:
        plan[f"{prefix}.to_add_out"] = _rowwise()
    width = attn.to_q.out_features
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        norm = getattr(attn, name, None)
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.shape[-1] == width and attn.heads > 1:
            plan[f"{prefix}.{name}"] = HeadShardedRMSNorm()
    if local_heads:
        plan[prefix] = LocalHeads()


def _mlp(plan: dict, first: str, last: str) -> None:
    plan[first] = _colwise()
    plan[last] = _rowwise()


def _qwen_plan(model) -> dict:
    plan: dict = {}
    _mlp(plan, "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2")
    for i, block in enumerate(model.transformer_blocks):
        p = f"transformer_blocks.{i}"
        _attention(plan, f"{p}.attn", block.attn, local_heads=False)
        for stream in ("img", "txt"):
            _mlp(plan, f"{p}.{stream}_mlp.net.0.proj", f"{p}.{stream}_mlp.net.2")
            plan[f"{p}.{stream}_mod.1"] = _gathered()
    plan["norm_out.linear"] = _gathered()
    return plan


def _flux_plan(model) -> dict:
    plan: dict = {}
    for name in ("timestep_embedder", "guidance_embedder", "text_embedder"):
        if getattr(model.time_text_embed, name, None) is not None:
            _mlp(plan, f"time_text_embed.{name}.linear_1", f"time_text_embed.{name}.linear_2")
    for i, block in enumerate(model.transformer_blocks):
        p = f"transformer_blocks.{i}"
        plan[f"{p}.norm1.linear"] = _gathered()
        plan[f"{p}.norm1_context.linear"] = _gathered()
        _attention(plan, f"{p}.attn", block.attn, local_heads=False)
        _mlp(plan, f"{p}.ff.net.0.proj", f"{p}.ff.net.2")
        _mlp(plan, f"{p}.ff_context.net.0.proj", f"{p}.ff_context.net.2")
    for i, block in enumerate(model.single_transformer_blocks):
        p = f"single_transformer_blocks.{i}"
        plan[f"{p}.norm.linear"] = _gathered()
        _attention(plan, f"{p}.attn", block.attn, local_heads=False)
        plan[f"{p}.proj_mlp"] = _colwise()
        plan[f"{p}.proj_out"] = PackedRowwiseParallel([block.attn.to_q.out_features, block.proj_mlp.out_features])
    plan["norm_out.linear"] = _gathered()
    return plan


def _wan_plan(model) -> dict:
    plan: dict = {}
    embedder = model.condition_embedder
    _mlp(plan, "condition_embedder.time_embedder.linear_1", "condition_embedder.time_embedder.linear_2")
    plan["condition_embedder.time_proj"] = _gathered()
    _mlp(plan, "condition_embedder.text_embedder.linear_1", "condition_embedder.text_embedder.linear_2")
    if getattr(embedder, "image_embedder", None) is not None:
        _mlp(plan, "condition_embedder.image_embedder.ff.net.0.proj", "condition_embedder.image_embedder.ff.net.2")
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        _attention(plan, f"{p}.attn1", block.attn1, local_heads=True)
        _attention(plan, f"{p}.attn2", block.attn2, local_heads=True)
        _mlp(plan, f"{p}.ffn.net.0.proj", f"{p}.ffn.net.2")
    return plan


def _z_image_plan(model) -> dict:
    plan: dict = {}
    _mlp(plan, "t_embedder.mlp.0", "t_embedder.mlp.2")
    for attr in ("noise_refiner", "context_refiner", "layers"):
        for i, block in enumerate(getattr(model, attr)):
            p = f"{attr}.{i}"
            _attention(plan, f"{p}.attention", block.attention, local_heads=True)
            plan[f"{p}.feed_forward.w1"] = _colwise()
            plan[f"{p}.feed_forward.w3"] = _colwise()
            plan[f"{p}.feed_forward.w2"] = _rowwise()
            if getattr(block, "modulation", False):
                plan[f"{p}.adaLN_modulation.0"] = _gathered()
    for key in model.all_final_layer:
        plan[f"all_final_layer.{key}.adaLN_modulation.1"] = _gathered()
    return plan


PLANS = {
    "QwenImageTransformer2DModel": (_qwen_plan, "num_attention_heads"),
    "FluxTransformer2DModel": (_flux_plan, "num_attention_heads"),
    "WanTransformer3DModel": (_wan_plan, "num_attention_heads"),
    "ZImageTransformer2DModel": (_z_image_plan, "n_heads"),
}


def _class_name(transformer: torch.nn.Module) -> str | None:
    return next((cls.__name__ for cls in type(transformer).__mro__ if cls.__name__ in PLANS), None)


def tensor_parallel_plan(transformer: torch.nn.Module) -> dict[str, ParallelStyle]:
    """Module path -> style, for the whole transformer. Modules not named stay replicated: patch/text input
    projections, the final projection (all small), norms over the model width, Wan's scale_shift_tables."""
    name = _class_name(transformer)
    if name is None:
        raise ValueError(tensor_parallel_problem(transformer, 2))
    return PLANS[name][0](transformer)


def _split_widths(module: torch.nn.Module, style: ParallelStyle) -> list[int]:
    if isinstance(style, PackedRowwiseParallel):
        return style.blocks
    if isinstance(style, RowwiseParallel):
        return [module.in_features]
    if isinstance(style, ColwiseParallel):
        return [module.out_features]
    if isinstance(style, HeadShardedRMSNorm):
        return [module.weight.shape[-1]]
    return []


def tensor_parallel_problem(transformer: torch.nn.Module, degree: int) -> str | None:
    """Why this transformer cannot be split `degree` ways, or None."""
    name = _class_name(transformer)
    if name is None:
        return (f"{type(transformer).__name__} has no tensor-parallel plan; known: "
                f"{', '.join(sorted(PLANS))}")
    if degree < 1:
        return f"a tensor-parallel degree must be 1 or more, not {degree}"
    config = getattr(transformer, "config", {})
    heads = config.get(PLANS[name][1])
    if heads is not None and heads % degree:
        valid = ", ".join(str(d) for d in range(1, heads + 1) if heads % d == 0)
        return (f"the transformer has {heads} attention heads, which {degree} tensor-parallel ranks cannot "
                f"split evenly. Valid: a divisor of {heads}: {valid}")
    kv_heads = config.get("n_kv_heads")
    if kv_heads is not None and kv_heads % degree:
        return f"the transformer has {kv_heads} key/value heads, which {degree} tensor-parallel ranks cannot split evenly"
    if any(getattr(m, "fused_projections", False) for m in transformer.modules()):
        return "its attention projections are fused (to_qkv); tensor parallel needs them separate"
    if any(isinstance(p, DTensor) for p in transformer.parameters()):
        return "it is already sharded (tensor parallel or FSDP)"
    if degree == 1:
        return None
    for path, style in PLANS[name][0](transformer).items():
        module = transformer.get_submodule(path)
        if isinstance(style, (ColwiseParallel, RowwiseParallel)) and (
                type(module).__name__ == "GGUFLinear" or not isinstance(module, (torch.nn.Linear, FP8Linear))):
            return f"{path} is a {type(module).__name__}, which tensor parallel cannot split (plain or FP8 linears only)"
        for width in _split_widths(module, style):
            if width % degree:
                return f"{path} has width {width}, which {degree} tensor-parallel ranks cannot split evenly"
    return None


def enable_tensor_parallel(transformer: torch.nn.Module, mesh) -> None:
    """Splits `transformer` in place over `mesh` (a 1-D DeviceMesh over the tensor-parallel ranks)."""
    problem = tensor_parallel_problem(transformer, mesh.size())
    if problem is not None:
        raise ValueError(f"tensor parallel: {problem}")
    if mesh.size() == 1:
        return
    for path, style in tensor_parallel_plan(transformer).items():
        module = transformer.get_submodule(path)
        if isinstance(module, FP8Linear):
            parent, _, child = path.rpartition(".")
            setattr(transformer.get_submodule(parent), child, TensorParallelFP8Linear.split(module, style, mesh))
        else:
            parallelize_module(module, mesh, style, src_data_rank=None)


def _local_index(blocks: list[int], rank: int, world: int) -> torch.Tensor:
    parts, offset = [], 0
    for size in blocks:
        chunk = size // world
        parts.append(torch.arange(offset + rank * chunk, offset + (rank + 1) * chunk))
        offset += size
    return torch.cat(parts)


class TensorParallelFP8Linear(FP8Linear):
    """This rank's share of an FP8Linear quantized over the full weight (scales as in one process).
    kind: "colwise" (rows, local output), "gathered" (rows, output all-gathered), "rowwise" (columns)."""

    @classmethod
    def split(cls, layer: FP8Linear, style: ParallelStyle, mesh) -> "TensorParallelFP8Linear":
        rank, world = mesh.get_local_rank(), mesh.size()
        weight, scale, bias = layer.weight.detach(), layer.weight_scale, layer.bias
        if isinstance(style, RowwiseParallel):
            blocks = style.blocks if isinstance(style, PackedRowwiseParallel) else [layer.in_features]
            index = _local_index(blocks, rank, world)
            local = cls(weight[:, index].contiguous(), scale, bias, layer.name, layer.fp8_matmul)
            local.kind = "rowwise"
        elif isinstance(style, ColwiseParallel):
            index = _local_index([layer.out_features], rank, world)
            local = cls(weight[index].contiguous(), scale[index].contiguous() if layer.per_channel else scale,
                        None if bias is None else bias.detach()[index].contiguous(), layer.name, layer.fp8_matmul)
            local.kind = "gathered" if isinstance(style.output_layouts[0], Replicate) else "colwise"
        else:
            raise ValueError(f"tensor parallel: {layer.name} is FP8 and its style {style} has no FP8 form")
        local.per_channel = layer.per_channel
        local.group, local.world = mesh.get_group(), world
        return local

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tensor_parallel={self.kind}/{self.world}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rowwise = self.kind == "rowwise"
        if self.fp8_matmul:
            out = self._fp8_matmul(x)
        else:
            out = F.linear(x, self.dequantized_weight(x.dtype), None if rowwise else self.bias)
        if rowwise:
            dist.all_reduce(out, group=self.group)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
        elif self.kind == "gathered":
            parts = [torch.empty_like(out) for _ in range(self.world)]
            dist.all_gather(parts, out.contiguous(), group=self.group)
            out = torch.cat(parts, dim=-1)
        self.finite = torch.isfinite(out).all()
        return out

    def _fp8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        rowwise = self.kind == "rowwise"
        amax = rows.abs().amax(dim=1, keepdim=True) if self.per_channel else rows.abs().amax()
        if rowwise:
            amax = amax.float()
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        x_scale = _scale_for(amax)
        w_scale = self.weight_scale.reshape(1, -1) if self.per_channel else self.weight_scale
        x_fp8 = (rows.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        out = fp8_product(x_fp8, self.weight.t(), x_scale, w_scale, x.dtype)
        if self.bias is not None and not rowwise:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)
